import numpy as np
rng = np.random.default_rng(0)
M, OUT = 1024, 2000
z = np.maximum(rng.standard_normal((OUT, M)), 0).astype(np.float32)
dy = rng.standard_normal((OUT, M)).astype(np.float32)
prod = z.astype(np.float64) * dy.astype(np.float64)   # exact fp32*fp32
exact = prod.sum(1)
def chain(p):  # sequential fma over columns
    acc = np.zeros(p.shape[0], np.float32)
    for k in range(p.shape[1]):
        acc = (acc.astype(np.float64) + p[:, k]).astype(np.float32)
    return acc
def kernel(p, split, block, two_level):
    parts = []
    for s in np.array_split(np.arange(p.shape[1]), split):
        q = p[:, s]
        if two_level:
            acc = np.zeros(p.shape[0], np.float32)
            for b in range(0, q.shape[1], block):
                acc = (acc + chain(q[:, b:b + block])).astype(np.float32)
        else:
            acc = chain(q)
        parts.append(acc)
    tot = parts[0]
    for x in parts[1:]:
        tot = (tot + x).astype(np.float32)
    return tot
def err(a): return np.abs(a - exact).max() / np.abs(exact).max()
print("pairwise fp32 (numpy)", err(prod.astype(np.float32).sum(1, dtype=np.float32)))
print("one chain of 512, split 2", err(kernel(prod, 2, 64, False)))
print("64-term dots + outer sum, split 2", err(kernel(prod, 2, 64, True)))
print("fp32 eps", np.finfo(np.float32).eps)
