"""Session 11: the split cases run several times: determinism and where the fused rollout departs from the reference."""
import sys, json
import numpy as np
from pallas_kernels import gpu_fused_selftest as st
from pallas_kernels import fused_generation as fg

names = sys.argv[1].split("|")
repeats = int(sys.argv[2])
out = {}
for case in st.CASES:
    if case.name not in names:
        continue
    model, x0, taus = st.build(case, 0)
    ref, gain = st.bounded_model(model, x0, case.steps, taus)
    runs = [np.asarray(fg.fused_generate(model, x0, case.steps, taus, config=case.config), np.float64) for _ in range(repeats)]
    scale = np.max(np.abs(ref))
    rows = []
    for ys in runs:
        d = np.abs(ys - ref) / scale
        bad = np.argwhere(d > 1e-6)
        first = bad[np.argmin(bad[:, 1])].tolist() if len(bad) else None
        rows.append(dict(err=float(d.max()), first_bad_row_step=first, n_bad=int(len(bad)),
                         worst_row_step=np.unravel_index(np.argmax(d.max(axis=-1)), d.shape[:2]).__repr__()))
    same = [bool(np.array_equal(runs[0], r)) for r in runs[1:]]
    out[case.name] = dict(path=st.path_of(case, model), runs=rows, identical_to_first=same)
    print(case.name, json.dumps(out[case.name]), flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
