"""Random projections P (d × r) with E[P Pᵀ] = I, regenerated from (seed, layer name, refresh index).

P is never stored: every draw is a pure function of its seed triple, so a resumed run (or another DDP rank)
regenerates the same P. Python's `hash()` is never used (it changes per process); names go through crc32.
"""

from __future__ import annotations

import math
import zlib

import torch

from ..config import PROJECTIONS
from ..errors import InvalidSettingsError


def projection_seed(seed: int, name: str, refresh_index: int) -> int:
    """A 63-bit seed from (global seed, crc32 of the layer's qualified name, refresh index)."""
    crc = zlib.crc32(name.encode("utf-8"))
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + crc * 0xBF58476D1CE4E5B9 + int(refresh_index) * 0x94D049BB133111EB)
    return mixed % (2**63 - 1)


def draw_projection(d: int, r: int, kind: str, seed: int, name: str, refresh_index: int) -> torch.Tensor:
    """P of shape (d, r) in float32 on the CPU with E[P Pᵀ] = I_d.

    stiefel: orthonormal columns (QR of a Gaussian, sign-fixed, i.e. Haar) times sqrt(d/r); relative variance
    of the lifted gradient (d − r)/r. gaussian: iid N(0, 1/r); variance (d + 1)/r. rademacher: iid ±1/sqrt(r).
    At r == d the Stiefel draw is the identity: nothing is compressed, so the estimator is exact.
    """
    if kind not in PROJECTIONS:
        raise InvalidSettingsError(f"projection={kind!r} is unknown; use one of {', '.join(PROJECTIONS)}.")
    if not 1 <= r <= d:
        raise InvalidSettingsError(f"rank {r} must be between 1 and the block width {d}.")
    if kind == "stiefel" and r == d:
        return torch.eye(d)
    g = torch.Generator().manual_seed(projection_seed(seed, name, refresh_index))
    if kind == "stiefel":
        a = torch.randn(d, r, generator=g, dtype=torch.float64)
        q, rr = torch.linalg.qr(a)  # (d, r), (r, r)
        q = q * torch.sign(torch.diagonal(rr)).masked_fill(torch.diagonal(rr) == 0, 1.0)  # Haar: fix signs
        return (q * math.sqrt(d / r)).float()
    if kind == "gaussian":
        return torch.randn(d, r, generator=g) / math.sqrt(r)
    signs = torch.randint(0, 2, (d, r), generator=g).float() * 2 - 1
    return signs / math.sqrt(r)


def subspace_transfer(p_old: torch.Tensor, p_new: torch.Tensor) -> torch.Tensor:
    """T (r × r) that carries subspace coordinates from P_old to P_new: m_new = m_old @ T.

    Least-squares: m_new P_newᵀ ≈ m_old P_oldᵀ, so T = P_oldᵀ P_new (P_newᵀ P_new)⁻¹. For Stiefel draws this is
    Q_oldᵀ Q_new with the orthonormal bases (the sqrt(d/r) scales cancel), as DESIGN.md section 2 requires.
    """
    p_old, p_new = p_old.double(), p_new.double()
    gram = p_new.T @ p_new
    return torch.linalg.solve(gram, (p_old.T @ p_new).T).T.float()


def estimator_relative_variance(d: int, r: int, kind: str = "stiefel") -> float:
    """E‖G P Pᵀ − G‖² / ‖G‖² for one row block of width d (the trace formula of the estimator's variance)."""
    if kind == "stiefel":
        return (d - r) / r
    if kind == "gaussian":
        return (d + 1) / r
    return (d - 1) / r  # rademacher: diagonal of PPᵀ is exactly 1, off-diagonal entries have variance 1/r
