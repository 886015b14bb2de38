"""How well Meta-World's scripted policies, the collectors of --env ml45, do on this project's ML45 tasks: one
noise-free episode per class (Meta-World's reset gives each goal one start, so one episode is the whole story),
its return and whether Meta-World's success flag was set, written to results/ml45/scripted.json.

    python studies/ml45_scripted.py
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402


def main():
    bench, start, classes = macaw.get_benchmark("ml45"), time.perf_counter(), {}
    with macaw.mujoco_warnings():
        for k in range(len(bench.tasks)):
            env = macaw.make_task_env(bench, k)
            ret = macaw.rollout(env, macaw.expert_actor(env), 0)
            classes[str(k)] = dict(name=macaw.ML45_CLASSES[k], held_out=k in bench.test_ids, scripted_return=ret,
                                   scripted_success=bool(env.successes[-1]))
            print(f"{k:2d} {macaw.ML45_CLASSES[k]:28s} return {ret:7.1f}  success {env.successes[-1]}")
    out = ROOT / "results" / "ml45" / "scripted.json"
    macaw.write_json(out, dict(classes=classes, commit=macaw.git_commit(), versions=macaw.versions(),
                               command="python studies/ml45_scripted.py", wall_time_s=time.perf_counter() - start))
    train = [c["scripted_success"] for c in classes.values() if not c["held_out"]]
    test = [c["scripted_success"] for c in classes.values() if c["held_out"]]
    print(f"success: {sum(train)} of {len(train)} training classes, {sum(test)} of {len(test)} held-out; wrote {out}")


if __name__ == "__main__":
    main()
