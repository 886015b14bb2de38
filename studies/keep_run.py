"""Keep a finished run in results/: its summary.json plus its evaluation curve from log.jsonl.

    python studies/keep_run.py runs/full/cheetah-vel-pearl-seed1 results/cheetah-vel/pearl-seed1.json

The curve holds, for every evaluation during training, the step, each held-out task's mean return before and
after adaptation (what the comparison figure draws) and the training losses logged then. A run without a summary (unfinished) is refused.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402


def kept(run_dir):
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        raise macaw.UserError(f"{run_dir} has no summary.json: the run has not finished")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses = {k: round(v, 4) for k, v in record.items() if k not in ("step", "time", "eval", "steps_per_s")}
        curve.append(dict(step=record["step"], **{when: {k: round(v[when], 2) for k, v in record["eval"].items()}
                                                   for when in ("pre", "post")}, losses=losses))
    return dict(summary, curve=curve)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        macaw.write_json(Path(args[1]), kept(args[0]))
    except macaw.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
