"""The ledger's Lua scripts, read from lua/*.lua, each preceded by the state constants.

Every transition of a shard is one script, run atomically by Redis: two workers, a sweeper and a
client can never both win one. Each file documents its KEYS and ARGV at the top.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis
from redis.commands.core import Script

from worker.ledger.states import lua_constants

SCRIPTS = ("register", "claim", "renew", "finish", "release", "requeue_lapsed", "split", "reopen", "republish")


@cache
def source(name: str) -> str:
    """The script `name` as Redis runs it: the constants, then the file."""
    if name not in SCRIPTS:
        raise KeyError(name)
    text = resources.files("worker.ledger").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return lua_constants() + text


def register_all(client: redis.Redis) -> dict[str, Script]:
    return {name: client.register_script(source(name)) for name in SCRIPTS}
