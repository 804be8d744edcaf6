"""Synthetic species-like embeddings for bench_scale: clustered, anisotropic, long-tailed, streamed in chunks.

Model (512-d, L2-normalised, like BioCLIP):
  * a global anisotropic space: a random rotation R and a power-law spectrum (var_i ~ i^-1), so most
    variance lies in ~100-200 directions (real embeddings: effective rank ~170 of 1024 for MobileNetV1);
  * taxonomy: genus centres ~ N(0, diag(spec)) ; species centre = genus centre + spread_s * N(0, spec);
  * species sizes long-tailed (lognormal, like TreeOfLife/SnakeCLEF: most species have few photos);
  * within a species: a low-rank "pose/background" subspace (rank 8..48 drawn from a shared pool of
    bases) scaled by a per-species spread (0.5..1.4x), plus small isotropic noise;
  * 2% near-duplicates (another photo of the chunk + tiny noise).
Everything for row i depends only on (seed, chunk index), so shards are generated independently and a
1M+ gallery never sits in RAM: write_f16() streams chunks into a float16 .npy file (memory-mapped later).
"""
from __future__ import annotations

import numpy as np

DIM = 512
CHUNK = 65536


class SpeciesSpace:
    """A random species space; :meth:`chunk` draws photos' embeddings from it."""

    def __init__(self, n_species: int, seed: int = 0, dim: int = DIM, n_genera: int | None = None,
                 n_bases: int = 128) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        spec = (np.arange(1, dim + 1, dtype=np.float32) ** -1.0)
        spec /= spec.sum()
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)).astype(np.float32))
        self.scale = (np.sqrt(spec) * np.sqrt(dim)).astype(np.float32)  # per-axis std (mean var 1)
        self.rot = q.astype(np.float32)
        n_genera = n_genera or max(1, n_species // 8)
        genus = rng.standard_normal((n_genera, dim), dtype=np.float32) * self.scale
        self.genus_of = rng.integers(0, n_genera, n_species)
        cent = genus[self.genus_of] + 0.55 * rng.standard_normal((n_species, dim), dtype=np.float32) * self.scale
        mean_dir = rng.standard_normal(dim).astype(np.float32)
        mean_dir /= np.linalg.norm(mean_dir)
        self.centres = (cent @ self.rot.T)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.centres += 0.65 * mean_dir  # a shared component: unrelated photos have cosine ~0.3 (CLIP-like)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        sizes = rng.lognormal(mean=0.0, sigma=1.3, size=n_species)
        self.p = sizes / sizes.sum()
        self.cum = np.cumsum(self.p)
        self.spread = rng.uniform(0.5, 1.4, n_species).astype(np.float32)
        ranks = rng.integers(8, 49, n_bases)
        self.bases = []  # each (r, dim): a decaying low-rank subspace inside the anisotropic space
        for r in ranks:
            b = (rng.standard_normal((r, dim)).astype(np.float32) * self.scale) @ self.rot.T
            b /= np.linalg.norm(b, axis=1, keepdims=True)
            self.bases.append((b * (np.arange(1, r + 1) ** -0.5)[:, None] * 1.3).astype(np.float32))
        self.basis_of = rng.integers(0, n_bases, n_species)
        self.seed = seed

    def chunk(self, index: int, n: int, *, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 (n, dim) unit rows, species int64 (n,)) of chunk ``index`` of stream ``stream``."""
        rng = np.random.default_rng([self.seed, stream, index])
        sp = np.searchsorted(self.cum, rng.random(n) * self.cum[-1]).clip(0, len(self.cum) - 1)
        x = self.centres[sp].copy()
        order = np.argsort(self.basis_of[sp], kind="stable")
        bsp = self.basis_of[sp]
        for b in np.unique(bsp):
            rows = order[bsp[order] == b]
            B = self.bases[b]
            z = rng.standard_normal((rows.size, B.shape[0]), dtype=np.float32)
            x[rows] += (z @ B) * (0.75 * self.spread[sp[rows]])[:, None]
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(0.25 / np.sqrt(self.dim))
        dup = rng.random(n) < 0.02
        if dup.any():
            src = rng.integers(0, n, int(dup.sum()))
            x[dup] = x[src] + rng.standard_normal((int(dup.sum()), self.dim), dtype=np.float32) * np.float32(0.05 / np.sqrt(self.dim))
            sp[dup] = sp[src]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, sp.astype(np.int64)


def n_species_for(n: int) -> int:
    """Species count for a gallery of n photos (~100 photos a species on average, at least 50)."""
    return max(50, n // 100)


def write_f16(path, n: int, space: SpeciesSpace, stream: int = 0) -> None:
    """Stream n vectors into a float16 .npy at ``path`` (never more than one chunk in RAM)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, space.dim))
    for c, s in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - s)
        out[s:s + m] = space.chunk(c, m, stream=stream)[0].astype(np.float16)
    out.flush()
    del out


def iter_f32(arr: np.ndarray, chunk: int = CHUNK):
    """(start, float32 chunk) over a (memory-mapped) float16 array."""
    for s in range(0, arr.shape[0], chunk):
        yield s, np.ascontiguousarray(arr[s:s + chunk], dtype=np.float32)
