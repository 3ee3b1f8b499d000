"""Prove a change keeps behaviour: run train, infer, segment and fseg on the sample data and compare outputs.

    python tools/compare_outputs.py revisions main HEAD --work /tmp/cmp   # two git revisions
    python tools/compare_outputs.py run OUT [--source DIR]                # one run of a source tree
    python tools/compare_outputs.py folders A B                          # two finished runs

`revisions` extracts each revision with `git archive`, runs the same commands from each under the
same output path (so recorded paths agree), then compares. Every file is compared byte for byte,
except what holds wall-clock or per-run facts: logs are skipped, JSON / JSON lines are compared with
timing and file-time keys removed, checkpoints tensor by tensor with the training history's
timings removed, OME-TIFFs byte for byte but their random UUID, and safetensors files with their
metadata read as a mapping (its key order varies from run to run). Each file is reported with how it was compared. Exit 1 on a difference.
Runs on the CPU with one thread (OMP_NUM_THREADS=1) so both sides compute the same floats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# wall-clock facts, and the checkpoint's size: torch.save names its archive after the temporary file
VOLATILE = re.compile(r"(seconds|_s$|per_s|mtime|elapsed|started|finished|timestamp|duration|^checkpoint_size$)")
OME_UUID = re.compile(rb"urn:uuid:[0-9a-f-]{36}")
SKIPPED = (".log",)


def commands(source: Path, out: Path) -> list[list[str]]:
    """The wsiseg command lines of one run: a one-epoch demo training, then inference with its checkpoint."""
    checkpoint = out / "train" / "checkpoints" / "best_model.pth"
    cmu = "{sample:cmu_svs}"
    return [
        ["train", str(source / "configs" / "demo.yaml"), "--device", "cpu", "--options", "training.epochs=1",
         "training.repeats=1", f"logging.output_dir={out / 'train'}"],
        ["infer", "--checkpoint", str(checkpoint), "--input_json", "{dataset_json}", "--output_dir",
         str(out / "infer"), "--device", "cpu"],
        ["infer", "--checkpoint", str(checkpoint), "--input_json", "{dataset_json}", "--output_dir",
         str(out / "infer_resize"), "--device", "cpu", "--mode", "resize"],
        ["segment", cmu, "--checkpoint", str(checkpoint), "--out", str(out / "segment"), "--device", "cpu",
         "--workers", "0"],
        ["segment", cmu, "--checkpoint", str(checkpoint), "--out", str(out / "segment_resize"), "--device", "cpu",
         "--workers", "0", "--mode", "resize"],
        ["fseg", cmu, "--out", str(out / "fseg"), "--k", "4", "--device", "cpu"],
    ]


def run(source: Path, out: Path) -> None:
    """Run every command with the wsiseg of `source` into `out` (which must not exist)."""
    if out.exists():
        raise SystemExit(f"{out} exists: pick a new folder")
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    probe = "import json, wsiseg; print(json.dumps({k: str(v) for k, v in wsiseg.fetch_samples().items()}))"
    samples = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                                        text=True).stdout)
    fill = {f"{{sample:{key}}}": value for key, value in samples.items()}
    for line in commands(source, out):
        if "{dataset_json}" in line:
            import yaml

            fill["{dataset_json}"] = yaml.safe_load((out / "train" / "config.yaml").read_text())["dataset"]["json"]
        args = [fill.get(arg, arg) for arg in line]
        print("wsiseg", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "wsiseg", *args], env=env, check=True, cwd=out)


def _strip(value: Any) -> Any:
    """`value` without the keys that hold wall-clock facts, at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not (isinstance(k, str) and VOLATILE.search(k))}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value


def _same_checkpoint(a: Path, b: Path) -> bool:
    import torch

    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
        if isinstance(value, (list, tuple)):
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}/{i}").items()}
        return {prefix: value}

    left, right = (flat(_strip(torch.load(p, map_location="cpu", weights_only=True))) for p in (a, b))
    if left.keys() != right.keys():
        return False
    for key, x in left.items():
        y = right[key]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def compare_file(a: Path, b: Path) -> tuple[bool, str]:
    """(same, how it was compared) for two files of the same relative path."""
    if a.suffix in SKIPPED:
        return True, "skipped (log)"
    if a.read_bytes() == b.read_bytes():
        return True, "bytes"
    if a.suffix == ".json":
        return _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text())), "json without timings"
    if a.suffix == ".jsonl":
        rows = [[_strip(json.loads(line)) for line in p.read_text().splitlines()] for p in (a, b)]
        return rows[0] == rows[1], "json lines without timings"
    if a.suffix == ".pth":
        return _same_checkpoint(a, b), "checkpoint tensors, timings removed"
    if a.name.endswith(".ome.tif"):
        return OME_UUID.sub(b"", a.read_bytes()) == OME_UUID.sub(b"", b.read_bytes()), "bytes but the OME UUID"
    if a.suffix == ".safetensors":
        return _safetensors(a) == _safetensors(b), "safetensors, metadata as a mapping"
    return False, "bytes"


def _safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, tensor bytes) of a safetensors file: its header's key order is not part of the content."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def compare(a: Path, b: Path) -> int:
    """Print one line per file and a summary; 0 when both folders hold the same outputs."""
    files = {p.relative_to(root) for root in (a, b) for p in root.rglob("*") if p.is_file()}
    differing, counts = 0, {}
    for rel in sorted(files):
        left, right = a / rel, b / rel
        if not (left.is_file() and right.is_file()):
            print(f"ONLY IN {'A' if left.is_file() else 'B'}  {rel}")
            differing += 1
            continue
        same, how = compare_file(left, right)
        counts[how] = counts.get(how, 0) + 1
        if not same:
            print(f"DIFFERS ({how})  {rel}")
            differing += 1
    print(f"{len(files)} files: " + ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))
          + f"; {differing} differ")
    return 1 if differing else 0


def extract(revision: str, into: Path) -> Path:
    """The source tree of a git revision, extracted with `git archive`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(into, filter="data")
    return into


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("out", type=Path)
    one.add_argument("--source", type=Path, default=ROOT)
    two = sub.add_parser("folders")
    two.add_argument("a", type=Path)
    two.add_argument("b", type=Path)
    revs = sub.add_parser("revisions")
    revs.add_argument("a")
    revs.add_argument("b")
    revs.add_argument("--work", type=Path, required=True, help="an empty folder for sources and outputs")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.source.resolve(), args.out.resolve())
        return 0
    if args.command == "folders":
        return compare(args.a, args.b)
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty")
    outputs = []
    for label, revision in (("a", args.a), ("b", args.b)):
        source = extract(revision, work / f"src-{label}")
        run(source, work / "run")  # the same path for both, so recorded paths agree
        outputs.append(shutil.move(work / "run", work / f"out-{label}"))
    print(f"A = {args.a}, B = {args.b}")
    return compare(*map(Path, outputs))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
