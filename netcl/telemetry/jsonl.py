"""JSON lines: one JSON object per written step, no dependency."""

import json
import math
from pathlib import Path


def _json_number(value):
    """Strict JSON has no NaN or infinity: those become the strings ``float()`` reads back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _numbers(values):
    return {key: _json_number(value) for key, value in values.items()}


class JSONLinesWriter:
    """Appends one JSON object per record to ``path`` (a ``.jsonl`` file).

    Each line::

        {"step": 100, "time": 1700000000.0, "optimizer_step": 100, "skipped": false,
         "scalars": {"loss": 0.31},
         "global": {"grad_norm": 1.2, ...},
         "groups": {"0": {"lr": 0.001, "stats": {...},
                          "params": {"fc1.weight": {"grad_norm": 0.8, ...}, ...}}}}

    Group indices and parameter indices become strings (JSON keys). NaN and
    infinities are written as the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"`` so every line is strict JSON; ``float()`` reads them back.
    ``per_param=False`` leaves out ``"params"`` (lines stay small on models with
    hundreds of tensors). Each line is flushed when written, so ``tail -f``
    and a crashed run both see every written step. The file is appended to:
    a resumed run continues it.
    """

    def __init__(self, path, *, per_param=True):
        self.path = Path(path)
        self.per_param = per_param
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record):
        groups = {}
        for index, group in record.stats["groups"].items():
            entry = {"lr": _json_number(group["lr"]), "stats": _numbers(group["stats"])}
            if self.per_param:
                entry["params"] = {str(key): _numbers(values)
                                   for key, values in group["params"].items()}
            groups[str(index)] = entry
        line = {"step": record.step, "time": record.time,
                "optimizer_step": record.optimizer_step, "skipped": record.skipped,
                "scalars": _numbers(record.scalars),
                "global": _numbers(record.stats["global"]), "groups": groups}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()
