"""The resumable-run engine of training, the search, the compress stages and AutoCompress.

A run saves its fingerprint (what it trains or searches: network, data hashes, settings) with every
checkpoint. A resumed run compares the saved fingerprint with its own field by field and refuses a
foreign run in one line naming what differs (`refuse_foreign`); `resume` restores the newest readable
checkpoint of its own run (`checkpoint.restore_newest`: unreadable newer steps are passed over);
outputs are written whole or not at all (`checkpoint.write_text`, `checkpoint.write_bytes`).
"""
import json
from typing import Callable, Collection, Mapping

from agmc_jax import checkpoint
from agmc_jax.errors import CheckpointError

FOREIGN = "holds a run of another network, data or setting"  # every refusal of a foreign run, after its place


def _plain(value):
    """`value` as JSON reads it back (tuples as lists), so a saved fingerprint compares equal to a fresh one."""
    return json.loads(json.dumps(value))


def differences(saved: Mapping, current: Mapping, defaults: Mapping | None = None, hashed: Collection = (),
                ignored: Collection = (), hints: Mapping | None = None) -> list:
    """What differs between a saved fingerprint and `current`, one 'field saved -> now' per field.

    Fields of `current`, and saved ones that `defaults` knows, are compared; a field missing on one side is at its
    `defaults` value (a field added since the run was saved compares as the setting that run had). Nested dicts
    compare field by field ('key.field', `defaults[key]` their defaults); `hashed` fields say '(another hash)';
    `ignored` fields (how long the run goes, for instance) are not compared. `hints[key]` (a format string of
    `field` and `old`) follows each changed field of that nested key: how to keep the saved setting.
    """
    defaults, hints = defaults or {}, hints or {}
    saved, current = _plain(dict(saved)), _plain(dict(current))
    changes = []
    for key in [*current, *sorted(set(saved) & set(defaults) - set(current))]:
        if key in ignored:
            continue
        old, new = saved.get(key, _plain(defaults.get(key))), current.get(key, _plain(defaults.get(key)))
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            inner = _plain(defaults.get(key) or {})
            old, new = {**inner, **old}, {**inner, **new}
            changes += [f"{key}.{field} {old.get(field)!r} -> {new.get(field)!r}" +
                        (f" ({hints[key].format(field=field, old=old.get(field))})" if key in hints else "")
                        for field in sorted(set(old) | set(new)) if old.get(field) != new.get(field)]
        elif key in hashed:
            changes.append(f"{key} (another hash)")
        else:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def refuse_foreign(saved: Mapping, current: Mapping, where, fix: str, **compare) -> None:
    """Raise a `CheckpointError` "`where` holds a run of another network, data or setting (what differs); `fix`" unless `saved` is this run's
    fingerprint (`compare`: the options of `differences`)."""
    changes = differences(saved, current, **compare)
    if changes:
        raise CheckpointError(f"{where} {FOREIGN} ({'; '.join(changes)}); {fix}")


def _whole(step, meta):
    return meta


def resume(directory, fingerprint: Mapping, restore: Callable, fix: str, saved: Callable = _whole, **compare):
    """(step, metadata, restore(step, metadata)) of the newest readable checkpoint in `directory` whose saved
    fingerprint (`saved(step, metadata)`, default the whole metadata) is `fingerprint`, None when there is none; a
    checkpoint of another run is refused in one line (`refuse_foreign`, `fix` saying what to do)."""
    def read(step):
        meta = checkpoint.metadata(directory, step)
        refuse_foreign(saved(step, meta), fingerprint, f"checkpoint {step} in {directory}", fix, **compare)
        return meta, restore(step, meta)

    found = checkpoint.restore_newest(directory, read)
    return None if found is None else (found[0], *found[1])
