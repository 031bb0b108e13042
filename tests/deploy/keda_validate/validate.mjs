// Validate KEDA objects (JSON array on stdin) against the KEDA CRD schemas packaged in
// @kubernetes-models/keda; prints one JSON line per object: {kind, name, ok, error}.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ScaledJob } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const models = { ScaledObject, ScaledJob, TriggerAuthentication };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const doc of JSON.parse(input)) {
  const Model = models[doc.kind];
  const name = doc.metadata?.name;
  if (!Model || doc.apiVersion !== "keda.sh/v1alpha1") {
    console.log(JSON.stringify({ kind: doc.kind, name, ok: false, error: "not a KEDA v1alpha1 kind" }));
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(JSON.stringify({ kind: doc.kind, name, ok: true }));
  } catch (err) {
    console.log(JSON.stringify({ kind: doc.kind, name, ok: false, error: String(err.message) }));
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
