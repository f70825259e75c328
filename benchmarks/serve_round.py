"""Usage: python benchmarks/serve_round.py N_CLIENTS

Cost of one secure-aggregation round over the HTTP API (Flask test client, in process) vs the same
protocol in-process (fedtensor.federated.secagg.secure_aggregate), same n, vector length and dropout."""
import sys, tempfile, time
from pathlib import Path
import numpy as np
from fedtensor.nn import NetConfig, new_net, save_model
from fedtensor.nn.checkpoint import read_model_bytes
from fedtensor.federated.secagg import secure_aggregate
from fedtensor.serve.app import create_app
from fedtensor.serve.auth import TokenRegistry
from fedtensor.serve.client import RoundParticipant
from fedtensor.serve.rounds import flat_params

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
reps = 3
tmp = Path(tempfile.mkdtemp())
save_model(new_net(NetConfig()), tmp / "m")
data, _, man = read_model_bytes(tmp / "m")
P = flat_params(data)[0].size
names = [f"h{i}" for i in range(n)]

class T:
    def __init__(s, c, tok): s.c, s.tok = c, tok
    def request(s, m, p, body=None, headers=None):
        h = dict(headers or {}); h["Authorization"] = f"Bearer {s.tok}"
        r = s.c.open("/api/v1" + p, method=m, data=body, headers=h)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data()

rng = np.random.default_rng(0)
deltas = [rng.uniform(-0.01, 0.01, P).astype(np.float32) for _ in range(n)]
weights = [int(w) for w in rng.integers(50, 500, n)]
http_t, local_t = [], []
for rep in range(reps):
    d = tmp / f"data{rep}"
    reg = TokenRegistry(d); toks = {nm: reg.add_client(nm)[1] for nm in names}; admin = reg.set_admin()
    app = create_app(d, config={"TESTING": True}); c = app.test_client()
    app.extensions["fedtensor_store"].publish(data, man)
    c.post("/api/v1/rounds", headers={"Authorization": f"Bearer {admin}"}, json={"max_total_weight": 10000})
    t0 = time.perf_counter()
    ps = [RoundParticipant(transport=T(c, toks[nm])) for nm in names]
    for p in ps: p.join()
    for p in ps: p.share()
    for p, dl, w in list(zip(ps, deltas, weights))[:-1]: p.mask(dl, w)   # the last client drops
    r = ps[0].current()["round"]
    c.post(f"/api/v1/rounds/{r}/close", headers={"Authorization": f"Bearer {admin}"})
    for p in ps[:-1]: p.unmask()
    http_t.append(time.perf_counter() - t0)
    assert ps[0].current()["status"] == "done"
    t0 = time.perf_counter()
    secure_aggregate(deltas, threshold=max(2, 2 * n // 3 + 1), weights=weights, dropouts_after_masking=[n - 1], clip=1.0)
    local_t.append(time.perf_counter() - t0)
h, l = np.median(http_t), np.median(local_t)
print(f"n={n} clients (1 dropout), {P} parameters: HTTP round {h:.3f} s, in-process secure_aggregate {l:.3f} s, ratio {h/l:.2f}x (median of {reps})")
