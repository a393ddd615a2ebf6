"""Where a training step's time goes: every XLA operation of the compiled step, timed by the JAX
profiler, charged to the hamjax source line that produced it.

    python experiments/bench_profile.py            # the small preset (B=16, T=256): HAM and GDN
    python experiments/bench_profile.py --quick    # the tiny preset, HAM only, 1 traced step

The step is the training step of `bench_train_step` (model built as training builds it, one
optimizer update, synthetic rows), compiled once as in `bench_memory` (XLA's own CPU fusions
kept). The compiled program's HLO carries, for each operation, the Python stack that traced it;
the profiler's trace (`jax.profiler.trace`, Perfetto JSON) times each operation by name over
--repeats steps after a warm-up. An operation is charged to the innermost frame in hamjax's
sources, or, where no hamjax frame is recorded (XLA drops some in the backward pass and in the
optimizer), to "(no hamjax frame) <op>". Times are operation time per step: operations run side
by side on several cores, so they add up to more than the step's wall time. Shares are of all the
operations' time in the same trace, ratios measured side by side. An XLA fusion is charged as its
root operation: a line's time can include work fused into it (on a CPU, YNNPACK fuses matmuls with
the elementwise work around them).
"""

from __future__ import annotations

import collections
import gzip
import json
import linecache
import pathlib
import re
import tempfile

import jax

import hamjax
from hamjax.bench.common import parse_args, save_results, variant
from hamjax.bench.memory import compiled_step
from hamjax.bench.train_step import MODELS
from hamjax.train import PRESETS

DEFAULT_OUTPUT = "runs/bench/profile.json"
NAMES = ("ham", "gdn")
QUICK_NAMES = ("ham",)
TOP_LINES = 15  # lines shown per model in the summary
NO_FRAME = "(no hamjax frame)"


def source_lines(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "path/in/hamjax.py:line" of the innermost hamjax frame that traced it,
    or "(no hamjax frame) <op name>", from the module's FileNames / FileLocations / StackFrames tables."""
    files, locations, frames, table = {}, {}, {}, None
    charged = {}
    for line in hlo_text.splitlines():
        text = line.strip()
        if text in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = text
        elif table == "FileNames" and (m := re.match(r'(\d+) "(.*)"$', text)):
            files[m[1]] = m[2]
        elif table == "FileLocations" and (m := re.match(r"(\d+) \{file_name_id=(\d+) .*?line=(\d+)", text)):
            locations[m[1]] = (files[m[2]], m[3])
        elif table == "StackFrames" and (m := re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", text)):
            frames[m[1]] = (m[2], m[3])
        elif m := re.match(r"(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}", text):
            frame = re.search(r"stack_frame_id=(\d+)", m[2])
            op = re.search(r'op_name="[^"]*?([^"/]*)"', m[2])
            charged[m[1]] = _hamjax_frame(frame[1] if frame else None, frames, locations) or (
                f"{NO_FRAME} {op[1] if op else '?'}"
            )
    return charged


def _hamjax_frame(frame: str | None, frames: dict, locations: dict) -> str | None:
    seen = set()
    while frame in frames and frame not in seen:
        seen.add(frame)
        location, parent = frames[frame]
        path, line = locations[location]
        if "/hamjax/" in path:
            return f"{path.rsplit('/hamjax/', 1)[1]}:{line}"
        frame = parent
    return None


def op_times(trace_dir: str, names: set[str]) -> collections.Counter:
    """Microseconds per operation name in the Perfetto trace under trace_dir, for the names given."""
    (path,) = pathlib.Path(trace_dir).rglob("*.trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            times[event["name"]] += event.get("dur", 0)
    return times


def profile(config, repeats: int) -> dict:
    """ms per step by hamjax source line and by file (and their shares) of config's training step."""
    compiled, args = compiled_step(config, config.train.batch_size, compiler_options={})
    charged = source_lines(compiled.as_text())
    # Loops (the micro-batch scan, the delta rule's chunk scan) are charged through their bodies.
    charged = {name: where for name, where in charged.items() if not name.startswith(("while", "call"))}
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(compiled(*args))
        times = op_times(folder, set(charged))
    by_line = collections.Counter()
    for name, microseconds in times.items():
        by_line[charged[name]] += microseconds / 1e3 / repeats
    total = sum(by_line.values())
    by_file = collections.Counter()
    for where, ms in by_line.items():
        by_file[where.split(":")[0] if not where.startswith(NO_FRAME) else NO_FRAME] += ms
    share = lambda counts: {k: {"ms": v, "share": v / total} for k, v in counts.most_common()}  # noqa: E731
    lines = {k: v | {"code": source_text(k)} for k, v in share(by_line).items()}
    return {"op_ms_per_step": total, "by_file": share(by_file), "by_line": lines}


def source_text(where: str) -> str:
    """The code at "path/in/hamjax.py:line" ("" for operations without a hamjax frame)."""
    if where.startswith(NO_FRAME):
        return ""
    path, line = where.rsplit(":", 1)
    return linecache.getline(str(pathlib.Path(hamjax.__file__).parent / path), int(line)).strip()


def main(argv=None):
    _, repeats, output, quick = parse_args(argv, __doc__, DEFAULT_OUTPUT, [PRESETS["small"].data.seq_len], 3,
                                           [PRESETS["tiny"].data.seq_len], 1)
    preset_name, names = ("tiny", QUICK_NAMES) if quick else ("small", NAMES)
    preset = PRESETS[preset_name]
    models = {}
    for name in names:
        models[name] = profile(variant(preset, preset.data.seq_len, **MODELS[name]), repeats)
        top = list(models[name]["by_line"].items())[:5]
        print(f"{name}: {models[name]['op_ms_per_step']:.0f} ms of operation time per step; top: "
              + ", ".join(f"{k} {v['share']:.0%}" for k, v in top), flush=True)
    return save_results(
        f"time per XLA operation of the {preset_name} preset's training step (B={preset.train.batch_size}, "
        f"T={preset.data.seq_len}), charged to hamjax source lines: {', '.join(names)}",
        [{"T": preset.data.seq_len, "models": models}],
        repeats,
        output,
        preset=preset_name,
    )


def summary(result: dict) -> str:
    """Per model the share of each hamjax file, then one table of each model's top lines."""
    models = result["rows"][0]["models"]
    lines = []
    for name, record in models.items():
        lines += [
            f"**{name}**: {record['op_ms_per_step']:.0f} ms of operation time per step. By file: "
            + ", ".join(f"{k} {v['share']:.0%}" for k, v in record["by_file"].items() if v["share"] >= 0.01) + ".",
            "",
        ]
    lines += ["| model | source line | code | op ms / step | share |", "|---|---|---|---|---|"]
    for name, record in models.items():
        for where, v in list(record["by_line"].items())[:TOP_LINES]:
            code = f"`{v['code']}`".replace("|", "&#124;") if v["code"] else ""
            lines.append(f"| {name} | {where} | {code} | {v['ms']:.1f} | {v['share']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
