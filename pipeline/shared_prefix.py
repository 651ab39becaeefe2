"""Tokens every row of a batch starts with (a chat template's system prompt, a fixed instruction), computed once per
batch instead of once per row: by the fine-tune's collator (one unpadded row, a mask per row) and by the evaluation's
teacher-forced pass (the prefix's cache repeated for every row). Either way every row's logits are the ones it gets
on its own: causal attention never lets a prefix token see what follows it."""

from __future__ import annotations

from dataclasses import dataclass

MIN_SHARED_PREFIX = 4  # a shorter common prefix saves less than the denser attention mask costs


def shared_prefix_length(features: list[dict]) -> int:
    """How many leading tokens every row shares and may be computed once: the common prefix of the rows' input ids,
    ending before the position that predicts any row's first labelled token (so every prediction is made in the
    rows' own part), leaving each row at least one token. 0 when that is under MIN_SHARED_PREFIX or for one row."""
    if len(features) < 2:
        return 0
    first = features[0]["input_ids"]
    limit = min(len(f["input_ids"]) - 1 for f in features)
    for f in features:
        labelled = next((i for i, label in enumerate(f["labels"]) if label != -100), len(f["labels"]))
        limit = min(limit, labelled - 1)
    common = 0
    while common < limit and all(f["input_ids"][common] == first[common] for f in features):
        common += 1
    return common if common >= MIN_SHARED_PREFIX else 0


def prefix_packed(features: list[dict], prefix: int, attention: str) -> dict:
    """The rows as one: `prefix` shared tokens, then each row's rest; labels in the same layout (the tokens at a
    boundary are never labelled: see `shared_prefix_length`), positions restarting after the prefix for each row,
    and a (1, 1, T, T) mask, boolean for SDPA, additive for eager attention."""
    import torch

    ids, labels = list(features[0]["input_ids"][:prefix]), [-100] * prefix
    positions, segments = list(range(prefix)), [0] * prefix
    for number, f in enumerate(features, start=1):
        rest = f["input_ids"][prefix:]
        ids += rest
        labels += f["labels"][prefix:]
        positions += range(prefix, prefix + len(rest))
        segments += [number] * len(rest)
    segment = torch.tensor(segments)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    visible = causal & ((segment[:, None] == segment[None, :]) | (segment[None, :] == 0))
    mask = visible if attention == "sdpa" else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo().min)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "attention_mask": mask[None, None]}


@dataclass(frozen=True)
class PrefixSharing:
    """How the fine-tune's collator shares a prefix: the mask it builds (`attention`: "sdpa" boolean, "eager"
    additive) and what one attention pair costs against one token through a layer's linear layers (`pair_cost`),
    to share only where the one long row computes less than the padded rows."""

    attention: str
    pair_cost: float

    @classmethod
    def for_model(cls, attention: str, config) -> PrefixSharing:
        """A layer's linear work per token, 2 x (4 h^2 + 3 h i) FLOPs, against 4 h per attention pair (scores and
        values)."""
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(attention, 4 * hidden / (2 * (4 * hidden * hidden + 3 * hidden * intermediate)))

    def pays(self, features: list[dict], prefix: int) -> bool:
        """Whether the packed row (every token once, all pairs of one mask) costs less than the padded batch (the
        longest row's width for every row): for short rows the tokens saved win, for long ones the quadratic mask
        loses."""
        width = max(len(f["input_ids"]) for f in features)
        packed = prefix + sum(len(f["input_ids"]) - prefix for f in features)
        return packed + self.pair_cost * packed ** 2 < len(features) * (width + self.pair_cost * width ** 2)
