"""Time-conditioned attribute regressor r_phi(x_t, t) for classifier guidance on measured attributes ("CG on
attributes"): the noisy classifier's network (Dhariwal & Nichol 2021, Sec. 4: the UNet's encoder trunk and the
attention-pooling head) with one output per attribute instead of one logit per class, trained by MSE on the training
set's normalised attribute values (guidelab.morpho's measurements) of x_t at uniform t.

Its guidance term, the Gaussian log-likelihood log N(v; r_phi(x_t, t), sigma_t^2), is guidelab.guidance.attributes'.
"""

import torch

from guidelab.errors import GuidelabError
from guidelab.models.classifier import NoisyClassifier
from guidelab.models.unet import check_attributes

T_BUCKETS = 10  # K: the held-out error `sigma_t` is tabulated in K equal buckets of t (bucket 0: the least noise)


class NoisyRegressor(NoisyClassifier):
    """r_phi(x_t, t) (B, A): the values of its `attributes` in raw units (pixels of a 28 px canvas; slant in radians).

    Buffers, saved with the weights and set by train_classifier.py: `attr_stats` (2, A), the training set's mean and
    SD of each attribute (the head predicts (v - mean) / SD); `sigma_t` (A, K), the held-out RMSE in raw units of each
    attribute in each of K = T_BUCKETS equal buckets of t (its predictive uncertainty as a function of the noise,
    the Gaussian's SD in the guidance term; the training set's SD until the first evaluation); `num_steps`, the T of
    the schedule it was trained on (which bucket a timestep falls in)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,  # ignored: the third positional argument of every classifier family; a regressor has no
        # classes (`build_classifier` passes the data set's)
        channels: int = 128,  # base width of the trunk
        channel_mult: tuple = (1, 2, 2, 2),  # width multiplier per resolution level
        num_res_blocks: int = 2,  # ResBlocks per level
        attn_resolutions: tuple = (16,),  # spatial sizes that get self-attention after each ResBlock
        dropout: float = 0.0,  # ResBlock dropout
        num_heads: int = 4,  # heads of the trunk's attention and of the pooling head
        use_scale_shift_norm: bool = True,  # ADM AdaGN for the time embedding, as in ADM's classifier
        attributes: tuple = ("thickness",),  # the measured attributes it predicts, one output each (guidelab.morpho)
    ):
        names = check_attributes(attributes, "classifier.attributes")
        if not names:
            raise GuidelabError(
                "classifier.attributes is empty; a regressor predicts at least one attribute, e.g. "
                "classifier.attributes=[thickness]"
            )
        super().__init__(
            in_channels,
            image_size,
            len(names),
            channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            dropout,
            num_heads,
            use_scale_shift_norm,
        )
        self.attributes = names
        A = len(names)
        self.register_buffer("attr_stats", torch.stack([torch.zeros(A), torch.ones(A)]))  # mean row, SD row
        self.register_buffer("sigma_t", torch.ones(A, T_BUCKETS))  # held-out RMSE per attribute and t bucket
        self.register_buffer("num_steps", torch.tensor(0))  # T of its schedule (0: not yet set)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noised images, t (B,) timesteps -> predicted attribute values (B, A) in raw units."""
        mean, std = self.attr_stats
        return self.normalised(x, t) * std + mean

    def normalised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's output (B, A): (v - mean) / SD of the training set, what the MSE loss is taken on."""
        return self.classify(self.features(x, t))

    def set_statistics(self, stats: dict, num_steps: int) -> None:
        """The training set's statistics ({name: {mean, std, ...}}, guidelab.attributes.statistics) and the schedule's
        T; sigma_t starts at the SD (the error of predicting the mean) until an evaluation measures it."""
        values = torch.tensor([[stats[n][k] for n in self.attributes] for k in ("mean", "std")])
        self.attr_stats.copy_(values)
        self.sigma_t.copy_(values[1][:, None].expand_as(self.sigma_t))
        self.num_steps.fill_(num_steps)


def t_bucket(t: torch.Tensor, num_steps: int, buckets: int = T_BUCKETS) -> torch.Tensor:
    """The bucket of each timestep t in [0, T): floor(t K / T), clamped to [0, K - 1] (t int or float)."""
    return torch.div(t * buckets, num_steps, rounding_mode="floor").long().clamp(0, buckets - 1)
