"""The direct-alignment losses a stage may name: the one declaration of each loss's name, function,
beta and other options (defaults and ranges).

Torch-free, so the spec can read it when a file is loaded (``rlhf_core.spec`` must not import torch);
``rlhf_core.losses.direct_alignment`` builds its name -> function table from it, and a test keeps
each function's keyword defaults equal to the values declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossOption:
    """One keyword hyperparameter of a loss besides beta: its default and the values it accepts.

    A bool default makes a switch, which takes true or false (1 or 0, as a number-typed field gives them).
    """

    default: float | bool
    ge: float | None = None  # lower bound, included
    gt: float | None = None  # lower bound, excluded
    lt: float | None = None  # upper bound, excluded

    @property
    def is_switch(self) -> bool:
        return isinstance(self.default, bool)

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not accepted (None: it is fine)."""
        if self.is_switch:
            return None if value in (True, False) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if self.ge is not None and value < self.ge:
            return f"must be >= {self.ge:g}"
        if self.gt is not None and value <= self.gt:
            return f"must be > {self.gt:g}"
        if self.lt is not None and value >= self.lt:
            return f"must be < {self.lt:g}"
        return None

    def accepted(self, value: float | bool) -> float | bool:
        """``value`` as the loss takes it: a switch's 1 / 0 become true / false."""
        return bool(value) if self.is_switch else value

    def describe(self) -> str:
        if self.is_switch:
            return f"default {str(self.default).lower()}, true or false"
        bounds = [(">=", self.ge), (">", self.gt), ("<", self.lt)]
        shown = ", ".join(f"{sign} {bound:g}" for sign, bound in bounds if bound is not None)
        return f"default {self.default:g}" + (f", {shown}" if shown else "")


@dataclass(frozen=True)
class DirectAlignmentLoss:
    """A loss as the spec and the trainer see it."""

    function: str  # name of the loss function in rlhf_core.losses.direct_alignment
    needs_reference: bool  # False: the stage loads no reference model
    paired: bool = True  # False: unpaired examples with a desirable label (KTO)
    beta: float | None = 0.1  # default beta; None: the loss takes no beta
    options: dict[str, LossOption] = field(default_factory=dict)

    def defaults(self) -> dict[str, float | bool]:
        """Every keyword hyperparameter (beta included, when taken) and its default."""
        betas = {"beta": self.beta} if self.beta is not None else {}
        return betas | {name: option.default for name, option in self.options.items()}


_POSITIVE = LossOption(1.0, gt=0)

DIRECT_ALIGNMENT_TABLE: dict[str, DirectAlignmentLoss] = {
    "dpo": DirectAlignmentLoss("dpo_loss", needs_reference=True),
    # eps is the fraction of labels taken as flipped: at 0.5 the loss no longer prefers either side
    "cdpo": DirectAlignmentLoss(
        "cdpo_loss", needs_reference=True, options={"label_smoothing": LossOption(0.1, ge=0, lt=0.5)}
    ),
    # false: h from summed log-ratios (the paper's); true: from per-token averages (TRL's)
    "ipo": DirectAlignmentLoss(
        "ipo_loss", needs_reference=True, options={"average_log_probs": LossOption(False)}
    ),
    "dpo_norm": DirectAlignmentLoss("dpo_norm_loss", needs_reference=True, beta=2.0),
    "simpo": DirectAlignmentLoss(
        "simpo_loss", needs_reference=False, beta=2.0, options={"gamma_beta_ratio": LossOption(0.5, ge=0)}
    ),
    "orpo": DirectAlignmentLoss(
        "orpo_loss", needs_reference=False, beta=None, options={"odds_ratio_weight": LossOption(0.1, gt=0)}
    ),
    "kto": DirectAlignmentLoss(
        "kto_loss",
        needs_reference=True,
        paired=False,
        options={"desirable_weight": _POSITIVE, "undesirable_weight": _POSITIVE},
    ),
    "apo_zero": DirectAlignmentLoss("apo_zero_loss", needs_reference=True),
    "apo_down": DirectAlignmentLoss("apo_down_loss", needs_reference=True),
    "dpo_nll": DirectAlignmentLoss(
        "dpo_nll_loss", needs_reference=True, options={"alpha": LossOption(1.0, ge=0)}
    ),
}
"""Loss name -> declaration; the names a ``direct_alignment`` stage (and ``iterative_dpo``) accepts."""
