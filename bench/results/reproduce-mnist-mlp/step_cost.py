"""Seconds per training step of clean / DeepDefense / PGD-AT / TRADES on the reference MLP (batch 100,
1 thread), interleaved in 5 rounds of 10 steps so that every method sees the same machine load;
medians. Needs reference/model.pt (ddfast reproduce mnist-mlp). Output: step_cost.txt."""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
torch.set_num_threads(1)
from ddfast.paper import data, models, train
from ddfast.paper.reproduce import load_weights
from ddfast import deepdefense_loss
prep = data.prepare("mnist")
net = load_weights(models.build_model("mlp"), str(__import__("pathlib").Path(__file__).resolve().parent / "reference" / "model.pt"))
opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the model stays the same for every method
g = torch.Generator().manual_seed(0)
def step(method, xb, yb):
    opt.zero_grad()
    if method == "clean":
        loss = F.cross_entropy(net(xb), yb)
    elif method == "deepdefense":
        loss = F.cross_entropy(net(xb), yb) + deepdefense_loss(net, xb, yb, lam=15, c=10, d=5, max_iter=5)
    else:
        cfg = train.TrainConfig(method=method)
        xa = train.pgd_examples(net, xb, yb, cfg, scale=prep.scale, bounds=prep.bounds, generator=g)
        if method == "pgd_at":
            loss = F.cross_entropy(net(xa), yb)
        else:
            both = net(torch.cat([xb, xa])); c, a = both[:100], both[100:]
            loss = F.cross_entropy(c, yb) + 6 * F.kl_div(F.log_softmax(a, 1), F.softmax(c, 1), reduction="batchmean")
    loss.backward(); opt.step()
times = {m: [] for m in ("clean", "deepdefense", "pgd_at", "trades")}
for r in range(5):
    for m in times:
        t = time.perf_counter()
        for i in range(10):
            s = (r * 10 + i) * 100
            step(m, prep.x_train[s:s + 100], prep.y_train[s:s + 100])
        times[m].append((time.perf_counter() - t) / 10)
base = statistics.median(times["clean"])
for m, v in times.items():
    print(f"{m:12s} {1000 * statistics.median(v):.1f} ms/step  {statistics.median(v) / base:.1f}x")
