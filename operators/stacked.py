"""A batch whose rows are measured by different operators: operator k on the rows of part k.

`restore_batch` draws the samples of several measurements in one sampler run. When each
measurement has its own forward model (inpainting with a different mask per image, say), the
batch's rows come in consecutive blocks, one block per measurement, and

    StackedOperator([A_1, A_2, ...], [n_1, n_2, ...])

is the block-diagonal operator that applies A_k to the n_k rows of block k. It is an ordinary
LinearOperator (A, A_adjoint, solve, log_det, sigma_y), so the guidance and the conjugate
gradient work on it unchanged; both act on each row on its own, so a row's result does not
depend on which blocks share its batch.

Every part must map the same x_shape to the same y_shape and have the same sigma_y: the batch
is one (B, *x_shape) tensor, and sigma_y is one number for the guidance and its stopping rule.
The solve is closed form only where every part's is (the guidance preconditions its Tweedie
conjugate gradient with it only then).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import LinearOperator, NoiseView, Shape


class StackedOperator(LinearOperator):
    """Operator k applied to the `counts[k]` consecutive rows of part k of a batch.

    Args:
        operators: the parts' operators (the same object may appear in several parts; it is
            stored once and shares its tensors).
        counts: the rows of each part, each >= 1; a batch has sum(counts) rows.

    Raises:
        ValueError: the lists differ in length, a count is not a positive integer, or the
            parts' sigma_y differ.
    """

    def __init__(self, operators: Sequence[LinearOperator], counts: Sequence[int]):
        operators, counts = list(operators), [int(count) for count in counts]
        if not operators or len(operators) != len(counts):
            raise ValueError(f"need one row count per operator and at least one of each, got {len(operators)} "
                             f"operators and {len(counts)} counts")
        if any(count < 1 for count in counts):
            raise ValueError(f"counts must be positive, got {counts}")
        for index, operator in enumerate(operators):
            if not isinstance(operator, LinearOperator):
                raise TypeError(f"operators[{index}] must be an operators.LinearOperator, got "
                                f"{type(operator).__name__}")
        sigmas = list(dict.fromkeys(operator.sigma_y_setting for operator in operators))  # a number or "auto"
        if len(sigmas) > 1:
            raise ValueError(f"the stacked operators must share one sigma_y, got {sigmas}")
        super().__init__(sigmas[0])
        self.parts = nn.ModuleList(operators)  # a module met twice is registered once (parameters(), .to())
        self.counts = tuple(counts)

    @property
    def rows(self) -> int:
        """The rows of a batch this operator acts on: sum(counts)."""
        return sum(self.counts)

    def _split(self, batch: Tensor, name: str) -> tuple[Tensor, ...]:
        """The batch's rows per part (views); a ValueError naming `name` if the batch size differs."""
        if batch.dim() < 1 or batch.shape[0] != self.rows:
            raise ValueError(f"{name} must have {self.rows} rows ({list(self.counts)} per stacked operator), "
                             f"got shape {tuple(batch.shape)}")
        return torch.split(batch, self.counts)

    def _per_part(self, values: Tensor | float) -> list[Tensor | float]:
        """A scalar (shared by every part) or a per-row tensor (B,) split by part."""
        if isinstance(values, Tensor) and values.dim() > 0:
            return list(self._split(values, "r"))
        return [values] * len(self.counts)

    # -- the forward model ------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        return torch.cat([operator.A(part) for operator, part in zip(self.parts, self._split(x, "x"))])

    def A_adjoint(self, y: Tensor) -> Tensor:
        return torch.cat([operator.A_adjoint(part) for operator, part in zip(self.parts, self._split(y, "y"))])

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Each part draws its own noise (inpainting's lives on the observed pixels only).
        return torch.cat([operator.measure(part, generator) for operator, part in zip(self.parts, self._split(x, "x"))])

    def y_shape(self, x_shape: Sequence[int]) -> Shape:
        return self._common(lambda operator: operator.y_shape(x_shape), f"x of shape {tuple(x_shape)}")

    def x_shape(self, y_shape: Sequence[int]) -> Shape:
        return self._common(lambda operator: operator.x_shape(y_shape), f"y of shape {tuple(y_shape)}")

    def _common(self, shape_of, what: str) -> Shape:
        shapes = {tuple(shape_of(operator)) for operator in self.parts}
        if len(shapes) > 1:
            raise ValueError(f"the stacked operators disagree on {what}: {sorted(shapes)}")
        return shapes.pop()

    # -- the solve the averaged likelihood needs --------------------------------------
    @property
    def has_closed_form_solve(self) -> bool:
        return all(operator.has_closed_form_solve for operator in self.parts)

    @property
    def is_identity(self) -> bool:
        return all(operator.is_identity for operator in self.parts)

    def solve(self, u: Tensor, r: Tensor | float, *, tol: float = 1e-6, max_iter: int = 200) -> Tensor:
        """(sigma_y^2 I + r A A^T) v = u, part by part: A A^T is block diagonal over the parts."""
        return torch.cat([operator.solve(part, r_part, tol=tol, max_iter=max_iter)
                          for operator, part, r_part in zip(self.parts, self._split(u, "u"), self._per_part(r))])

    def log_det(self, r: Tensor | float, y_like: Tensor) -> Tensor | None:
        """Each part's log det per row, (B,); None unless every part has a cheap one."""
        values = [operator.log_det(r_part, part)
                  for operator, part, r_part in zip(self.parts, self._split(y_like, "y_like"), self._per_part(r))]
        return None if any(value is None for value in values) else torch.cat(values)

    def noise_view(self, y: Tensor) -> NoiseView:
        raise ValueError("a StackedOperator acts on a batch of measurements: estimate sigma_y from each part's own "
                         "measurement (restore_batch does, for parts with sigma_y='auto')")

    def with_sigma_y(self, sigma_y: float | str) -> "StackedOperator":
        """The same parts with noise level `sigma_y` (each part's own `with_sigma_y`, so their
        tensors are shared, and a part met twice is copied once)."""
        copies: dict[int, LinearOperator] = {}
        for operator in self.parts:
            copies.setdefault(id(operator), operator.with_sigma_y(sigma_y))
        return StackedOperator([copies[id(operator)] for operator in self.parts], self.counts)

    def to_matrix(self, x_shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> Tensor:
        raise NotImplementedError("a StackedOperator acts on a batch of sum(counts) rows: take each part's to_matrix")

    def extra_repr(self) -> str:
        return f"counts={list(self.counts)}, sigma_y={self.sigma_y_setting}"


def stack_operators(operators: Sequence[LinearOperator], counts: Sequence[int]) -> LinearOperator:
    """The operator of a batch whose part k (`counts[k]` rows) is measured by `operators[k]`.

    Neighbouring parts with the same operator object are merged, and where a single operator
    is left it is returned itself: a batch measured by one operator needs no stacking.
    """
    merged: list[tuple[LinearOperator, int]] = []
    for operator, count in zip(operators, counts):
        if merged and merged[-1][0] is operator:
            merged[-1] = (operator, merged[-1][1] + count)
        else:
            merged.append((operator, count))
    if len(merged) == 1:
        return merged[0][0]
    return StackedOperator([operator for operator, _ in merged], [count for _, count in merged])
