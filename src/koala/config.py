"""Typed experiment configuration: TOML in, validated settings out, clear errors for bad input.

Keys are kebab-case in TOML files and snake_case in Python. Unknown keys, wrong types and impossible
values are rejected with a message that names the key and what is allowed.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from koala.errors import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    """Base of every config section: kebab-case keys, no unknown keys, strict types."""

    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=_kebab, populate_by_name=True, frozen=True
    )


class DataConfig(_Section):
    """Which data set, and how it is split between the server's proxy set and the clients."""

    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "digits", "synthetic"] = "fashion-mnist"
    dir: str = Field("", description="data directory; empty = the data set's default or env var")
    train_limit: int = Field(0, ge=0, description="use only this many training images (0 = all)")
    test_limit: int = Field(0, ge=0, description="evaluate on only this many test images (0 = all)")
    num_clients: int = Field(20, ge=1)
    partition: Literal["iid", "dirichlet", "k-labels"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over labels")
    labels_per_client: int = Field(2, ge=1, description="k for the k-labels partition")
    min_client_size: int = Field(10, ge=1, description="Dirichlet redraws until every client has this many")
    validation_size: int = Field(
        0, ge=0,
        description="training images held out as a validation split (disjoint from the proxy set, the clients "
        "and the test split), evaluated beside the test split every round to choose settings on (0 = none)",
    )
    proxy_fraction: float = Field(0.1, gt=0, lt=1, description="share of training images kept as the server proxy set")
    proxy_size: int = Field(0, ge=0, description="how many training images the proxy set holds (0 = proxy-fraction of them)")
    client_size: int = Field(
        0, ge=0,
        description="how many training images the clients share (0 = all that the proxy set leaves); the same "
        "images whatever the proxy size, so that proxy sizes can be compared on fixed client data",
    )
    proxy_labelled: int = Field(
        0, ge=0, description="how many proxy images the server holds labels for (its labelled server set)"
    )


class ModelsConfig(_Section):
    """The large server model, the small client architectures and how clients get them."""

    large: str = "resnet18-ds"
    small: list[str] = Field(default_factory=lambda: ["lenet"], min_length=1)
    small_shares: list[float] = Field(
        default_factory=list, description="share of clients per small architecture; empty = equal"
    )
    assignment: list[str] = Field(
        default_factory=list, description="explicit small architecture per client id (overrides shares)"
    )
    capability: list[str] = Field(
        default_factory=list,
        description="with [[devices]]: models.small from the least to the most capable (empty = by parameter count)",
    )

    @model_validator(mode="after")
    def _check_assignment(self) -> ModelsConfig:
        if len(set(self.small)) != len(self.small):
            raise ValueError(f"models.small lists an architecture twice: {self.small}")
        if self.small_shares:
            if len(self.small_shares) != len(self.small):
                raise ValueError(
                    f"models.small-shares has {len(self.small_shares)} entries but models.small has "
                    f"{len(self.small)}; give one share per small architecture"
                )
            if any(s <= 0 for s in self.small_shares) or abs(sum(self.small_shares) - 1.0) > 1e-6:
                raise ValueError(
                    f"models.small-shares must be positive and sum to 1, got {self.small_shares} "
                    f"(sum {sum(self.small_shares):.6g})"
                )
        if self.capability and sorted(self.capability) != sorted(self.small):
            raise ValueError(
                f"models.capability {self.capability} must list exactly the architectures of models.small {self.small}"
            )
        unknown = sorted(set(self.assignment) - set(self.small))
        if unknown:
            raise ValueError(
                f"models.assignment names {unknown}, which are not in models.small {self.small}"
            )
        return self

    @property
    def heterogeneous(self) -> bool:
        return len(self.small) > 1


class OptimizerConfig(_Section):
    """SGD settings for one kind of training (client local training, or server distillation)."""

    epochs: int = Field(1, ge=0)
    batch_size: int = Field(64, ge=2, description="at least 2: BatchNorm cannot train on one example")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: the learning rate falls from lr to 0 over the steps of each training call"
    )


class DistillOptimizerConfig(OptimizerConfig):
    """SGD settings of one server distillation, with optional early stopping."""

    holdout_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="share of the proxy set held out to stop early on its KD loss (0 = off; epochs is then the most)",
    )
    patience: int = Field(2, ge=1, description="epochs without a better held-out loss before stopping")
    flip: bool = Field(False, description="augment proxy batches with random horizontal flips (the teacher sees the same view)")
    max_shift: int = Field(
        0, ge=0, description="augment proxy batches with random shifts of up to this many pixels (0 = off)"
    )

    @property
    def augments(self) -> bool:
        """Whether the proxy batches are augmented (the teacher then runs on every batch's view)."""
        return self.flip or self.max_shift > 0


class PretrainConfig(OptimizerConfig):
    """Supervised training of the large model on the labelled server set (large-init.kind = 'pretrain')."""

    epochs: int = Field(10, ge=1)


class LargeInitConfig(_Section):
    """Where the large model starts: random, a local weights file, or pretrained on the server set."""

    kind: Literal["random", "file", "pretrain"] = "random"
    path: str = Field("", description="weights file (.safetensors or torch state dict) for kind = 'file'")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _check_path(self) -> LargeInitConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("large-init.kind = 'file' needs large-init.path = the weights file")
        return self


class ClientConfig(OptimizerConfig):
    """Client sampling and local training."""

    participation: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled each round")
    min_replies: int = Field(
        1, ge=1, description="fewest accepted updates for a round to change the server's models"
    )
    dropout_probability: float = Field(
        0.0, ge=0, lt=1, description="chance that a sampled client is unreachable in a round (simulated failures)"
    )
    max_update_norm: float = Field(
        0.0, ge=0, description="clip an update's L2 distance from the model it was sent to this norm (0 = off)"
    )
    vectorised: bool = Field(
        False,
        description="local engine: train the round's clients of each architecture together (stacked models, "
        "vmap), with the same updates as one after another within float tolerance",
    )
    vectorised_chunk: int = Field(
        100, ge=1, description="the most clients trained in one stacked pass (bounds the memory of vectorised training)"
    )

    sampling: Literal["fixed-size", "poisson"] = Field(
        "fixed-size",
        description="fixed-size: each round asks round(participation x clients) of them; poisson: each client is "
        "asked independently with probability participation (what user-level DP's add/remove accounting assumes)",
    )

    def clients_per_round(self, num_clients: int) -> int:
        """How many clients a round samples."""
        return max(1, round(self.participation * num_clients))


class DistillConfig(_Section):
    """Reverse (small -> large) and forward (large -> small) distillation on the proxy set."""

    temperature: float = Field(3.0, gt=0)
    teacher: Literal["averaged", "ensemble"] = Field(
        "averaged",
        description="reverse-KD teacher of each architecture: its averaged model (the paper's reading), "
        "or the mean logits of the round's client models (FedDF's ensemble)",
    )
    fusion: str = Field("sample-share", description="how the teachers of several architectures are fused")
    reverse: DistillOptimizerConfig = Field(default_factory=DistillOptimizerConfig)
    forward: DistillOptimizerConfig = Field(default_factory=DistillOptimizerConfig)
    forward_warmup_rounds: int = Field(
        0, ge=0, description="rounds at the start in which forward distillation is skipped"
    )
    forward_mix: float = Field(
        1.0, ge=0, le=1,
        description="the small models clients receive: this share of the forward-distilled weights, the rest "
        "the round's averaged weights (1 = distilled only)",
    )
    keep_optimizer_state: bool = Field(
        False, description="carry the server's SGD momentum across rounds (reverse and forward distillation)"
    )
    reverse_kd_scaling: Literal["none", "teacher-quality"] = Field(
        "none",
        description="teacher-quality: scale reverse KD by the teacher's accuracy over the large model's on the "
        "labelled server set (at most 1), so weak teachers cannot wipe out a better (pretrained) large model",
    )
    reverse_ce_weight: float = Field(
        0.0, ge=0, description="weight of cross-entropy on the labelled server set in reverse distillation (0 = off)"
    )
    reverse_self_weight: float = Field(
        0.0, ge=0, lt=1,
        description="share of the large model's own softened predictions, from before the round, in the reverse "
        "targets: self-distillation that anchors it without labels (0 = off)",
    )
    reverse_selection: Literal["none", "confidence"] = Field(
        "none",
        description="confidence: per proxy image, the reverse target is the fused teachers' only where they are at "
        "least as confident as the large model was before the round, else its own prediction (label-free "
        "selective fusion)",
    )
    reverse_guard_size: int = Field(
        0, ge=0,
        description="keep the large model's better self (koala, feddf): the labels of this many labelled server "
        "images (the last of them; the images stay in the proxy set) are held out of pretraining, cross-entropy "
        "and teacher-quality scaling, and a round's reverse distillation is kept only if the large model is at "
        "least as accurate on them as before it, less distill.reverse-guard-tolerance; else the large model and "
        "its momentum stay (0 = off)",
    )
    reverse_guard_tolerance: float = Field(
        0.0, ge=0, lt=1,
        description="the guard (distill.reverse-guard-size) undoes a round only when the large model's accuracy on "
        "its images falls more than this below the last kept model's (a fraction: 0.02 = 2 points). A guard of a "
        "few hundred images varies by a few points between equally good models, and with no tolerance one lucky "
        "round stops every later one. Each round is compared with the last kept model, so falls within the "
        "tolerance can add up over rounds (0 = any fall undoes the round)",
    )
    initial_forward_epochs: int = Field(
        0, ge=0,
        description="before round 1, distil the starting large model into every small model for this many epochs "
        "(forward settings otherwise), so that the clients' first models carry its knowledge (0 = off)",
    )
    proxy_split: Literal["shared", "disjoint", "alternating"] = Field(
        "shared",
        description="which proxy images each distillation uses (koala). shared: both use all of them. The others "
        "cut the unlabelled proxy images into two halves; the labelled ones are always reverse distillation's "
        "(cross-entropy keeps every label) and never forward's. disjoint: reverse on the labelled images and the "
        "first half, forward on the second, every round. alternating: round r's forward distillation on half r "
        "mod 2 (the initial one on half 0), its reverse on the labelled images and the same half; either way the "
        "clients' models teach the large one on images they were not last fitted to it on",
    )


class DeviceClassConfig(_Section):
    """A class of client devices and its budgets; each class gets the most capable small model that fits."""

    name: str = Field(min_length=1)
    share: float = Field(0.0, ge=0, le=1, description="share of the clients in this class (or give count)")
    count: int = Field(0, ge=0, description="number of clients in this class (or give share)")
    memory_mb: float = Field(gt=0, description="training-memory budget of one client, MB (10^6 bytes)")
    flops_per_round: float = Field(0.0, ge=0, description="training FLOPs a client may spend a round (0 = no budget)")
    upload_mb: float = Field(0.0, ge=0, description="MB a client may upload a round, its model's state (0 = no budget)")


class PrivacyConfig(_Section):
    """User-level differential privacy of what clients upload (DP-FedAvg within each architecture):
    every update is clipped to client.max-update-norm = C, and the server adds Gaussian noise of
    standard deviation noise-multiplier x C to each architecture's sum before averaging."""

    noise_multiplier: float = Field(0.0, ge=0, description="sigma: the noise's standard deviation over C (0 = off)")
    target_epsilon: float = Field(0.0, ge=0, description="solve sigma for this epsilon after all rounds (0 = give sigma)")
    delta: float = Field(0.0, ge=0, lt=1, description="the guarantee's delta (0 = one tenth of 1 / data.num-clients)")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's accountant: Renyi DP or privacy loss distributions")
    sample_noise_multiplier: float = Field(
        0.0, ge=0, description="DP-SGD on every client (Opacus): the per-sample gradients' noise over their clip (0 = off)"
    )
    sample_max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD: each example's gradient is clipped to this L2 norm")
    sample_delta: float = Field(1e-5, gt=0, lt=1, description="DP-SGD: the delta of the per-example guarantee")

    @property
    def enabled(self) -> bool:
        """Whether the uploads are private (user-level DP-FedAvg)."""
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    @property
    def sample_level(self) -> bool:
        """Whether the clients train with DP-SGD (sample-level DP)."""
        return self.sample_noise_multiplier > 0


class FlowerConfig(_Section):
    """Waits of the Flower engines (the local engine ignores them). Every wait has a limit."""

    node_timeout: float = Field(120.0, gt=0, description="seconds to wait for every client's SuperNode to connect")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for a round's replies")


class ExperimentConfig(_Section):
    """A whole experiment: one seed derives every random stream."""

    name: str = "koala"
    algorithm: Literal["koala", "fedavg-large", "fedavg-small", "feddf", "centralised"] = "koala"
    seed: int = 0
    rounds: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1, description="evaluate every k rounds (and always after the last)")
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    large_init: LargeInitConfig = Field(default_factory=LargeInitConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    devices: list[DeviceClassConfig] = Field(
        default_factory=list,
        description="client device classes ([[devices]]): each gets the most capable of models.small within its budgets",
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> ExperimentConfig:
        sampled = self.client.clients_per_round(self.data.num_clients)
        if self.client.min_replies > sampled:
            raise ValueError(
                f"client.min-replies = {self.client.min_replies} but a round samples only {sampled} client(s) "
                f"(client.participation = {self.client.participation} of {self.data.num_clients}); lower min-replies"
            )
        if self.models.assignment and len(self.models.assignment) != self.data.num_clients:
            raise ValueError(
                f"models.assignment has {len(self.models.assignment)} entries but data.num-clients is "
                f"{self.data.num_clients}; give one architecture per client"
            )
        for needs_labels, setting in ((self.distill.reverse_ce_weight > 0, "distill.reverse-ce-weight > 0"),
                                      (self.distill.reverse_kd_scaling != "none", "distill.reverse-kd-scaling = "
                                       f"'{self.distill.reverse_kd_scaling}'")):
            if needs_labels and self.data.proxy_labelled == 0:
                raise ValueError(
                    f"{setting} needs a labelled server set: set data.proxy-labelled "
                    "to the number of proxy images the server has labels for"
                )
        if self.distill.reverse_guard_size:
            _check_guard(self)
        elif self.distill.reverse_guard_tolerance:
            raise ValueError(
                f"distill.reverse-guard-tolerance = {self.distill.reverse_guard_tolerance} is the guard's tolerance, "
                "but distill.reverse-guard-size = 0 turns the guard off: set distill.reverse-guard-size to the "
                "number of labelled server images the guard holds out, or distill.reverse-guard-tolerance = 0"
            )
        if self.distill.initial_forward_epochs and self.large_init.kind == "random":
            raise ValueError(
                "distill.initial-forward-epochs > 0 distils the starting large model into the small ones, but "
                "large-init.kind = 'random' starts it untrained: set large-init.kind to 'pretrain' or 'file', "
                "or distill.initial-forward-epochs = 0"
            )
        if self.distill.proxy_split != "shared":
            _check_proxy_split(self)
        if self.devices:
            _check_device_classes(self)
        if self.privacy.enabled:
            _check_privacy(self)
        if self.privacy.sample_level:
            _check_dp_sgd(self)
        if self.large_init.kind == "pretrain" and self.data.proxy_labelled == 0:
            raise ValueError(
                "large-init.kind = 'pretrain' needs a labelled server set: set data.proxy-labelled "
                "to the number of proxy images the server has labels for"
            )
        return self


def _check_guard(config: ExperimentConfig) -> None:
    """The guard's images come out of the labelled server set; what needs labels keeps the rest."""
    guard, labelled = config.distill.reverse_guard_size, config.data.proxy_labelled
    if config.algorithm not in ("koala", "feddf"):
        raise ValueError(
            f"distill.reverse-guard-size guards reverse distillation, which algorithm = '{config.algorithm}' does "
            "not do: set distill.reverse-guard-size = 0, or algorithm = 'koala'"
        )
    needs_rest = (config.distill.reverse_ce_weight > 0 or config.distill.reverse_kd_scaling != "none"
                  or config.large_init.kind == "pretrain")
    if labelled < guard or (needs_rest and labelled == guard):
        rest = " and leave some for pretraining and cross-entropy" if needs_rest else ""
        raise ValueError(
            f"distill.reverse-guard-size = {guard} holds out that many labelled server images, but "
            f"data.proxy-labelled = {labelled}: lower distill.reverse-guard-size or raise data.proxy-labelled{rest}"
        )


def _check_proxy_split(config: ExperimentConfig) -> None:
    """distill.proxy-split divides the proxy set between the two distillations: both must run."""
    split = f"distill.proxy-split = '{config.distill.proxy_split}' divides the proxy images between reverse and forward distillation"
    if config.algorithm != "koala":
        raise ValueError(f"{split}, but algorithm = '{config.algorithm}' has no forward distillation: "
                         "set distill.proxy-split = 'shared'")
    if config.distill.forward.epochs == 0:
        raise ValueError(f"{split}, but distill.forward.epochs = 0 turns forward distillation off: "
                         "set distill.proxy-split = 'shared' or distill.forward.epochs > 0")
    if config.distill.proxy_split == "alternating" and config.distill.forward_warmup_rounds:
        raise ValueError(f"{split}, alternating halves by round, but distill.forward-warmup-rounds = "
                         f"{config.distill.forward_warmup_rounds} skips forward distillation in the first rounds, so a "
                         "round would reverse-distil on the half its clients were last fitted on: set "
                         "distill.forward-warmup-rounds = 0 or distill.proxy-split = 'disjoint'")


def _check_device_classes(config: ExperimentConfig) -> None:
    """[[devices]] choose every client's small model, from shares or counts that cover the clients."""
    devices, models = config.devices, config.models
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError(f"devices: a class name is given twice: {names}")
    if models.small_shares or models.assignment:
        raise ValueError("devices choose each client's small model: drop models.small-shares and models.assignment")
    by_share, by_count = [d for d in devices if d.share > 0], [d for d in devices if d.count > 0]
    if len(by_share) != len(devices) and len(by_count) != len(devices):
        raise ValueError("devices: give every class a share, or every class a count (and not both)")
    if by_share and abs(sum(d.share for d in devices) - 1) > 1e-6:
        raise ValueError(f"devices: the shares must sum to 1, got {sum(d.share for d in devices):.6g}")
    if by_count and len(by_count) == len(devices) and sum(d.count for d in devices) != config.data.num_clients:
        raise ValueError(f"devices: the counts sum to {sum(d.count for d in devices)} but data.num-clients is "
                         f"{config.data.num_clients}")


def _check_privacy(config: ExperimentConfig) -> None:
    """User-level DP needs its clipping norm, and nothing that reads a single client's model."""
    privacy = config.privacy
    if privacy.noise_multiplier and privacy.target_epsilon:
        raise ValueError("privacy: give privacy.noise-multiplier or privacy.target-epsilon, not both")
    if config.client.max_update_norm == 0:
        raise ValueError("privacy needs client.max-update-norm = C > 0: each update is clipped to norm C before the "
                         "noise (of standard deviation noise-multiplier x C) is added")
    if privacy.delta and privacy.delta >= 1 / config.data.num_clients:
        raise ValueError(f"privacy.delta = {privacy.delta:g} is not below 1 / data.num-clients = "
                         f"{1 / config.data.num_clients:g}: a guarantee that may fail for one client in "
                         f"{config.data.num_clients} protects nobody; lower it (0 = the default)")
    if config.algorithm in ("feddf", "centralised") or config.distill.teacher == "ensemble":
        what = ("algorithm = 'feddf' distils the ensemble of the round's client models" if config.algorithm == "feddf"
                else "algorithm = 'centralised' trains on the clients' pooled data" if config.algorithm == "centralised"
                else "distill.teacher = 'ensemble' distils each client's own model")
        raise ValueError(f"privacy: {what}, which the noise on the architectures' sums does not protect; "
                         "use distill.teacher = 'averaged' with algorithm koala, fedavg-small or fedavg-large")


def _check_dp_sgd(config: ExperimentConfig) -> None:
    """DP-SGD trains each client on its own, with a constant learning rate."""
    if config.algorithm == "centralised":
        raise ValueError("privacy.sample-noise-multiplier: algorithm = 'centralised' has no clients to train with DP-SGD")
    if config.client.vectorised:
        raise ValueError("privacy.sample-noise-multiplier: DP-SGD trains one client at a time (Opacus's per-sample "
                         "gradients); set client.vectorised = false")
    if config.client.lr_schedule != "constant":
        raise ValueError("privacy.sample-noise-multiplier: DP-SGD runs at a constant learning rate; set "
                         "client.lr-schedule = 'constant'")
    smallest = config.data.min_client_size
    if smallest and config.privacy.sample_delta >= 1 / smallest:
        raise ValueError(f"privacy.sample-delta = {config.privacy.sample_delta:g} is not below 1 / data.min-client-size "
                         f"= {1 / smallest:g}: a guarantee that may fail for one example in a client's data protects "
                         "none of them; lower it")


def _format_location(loc: tuple[Any, ...]) -> str:
    """`section.key`, with list positions as `[i]` (e.g. devices[1].memory-mb)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section at `loc` (used to suggest a fix for an unknown key)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part).replace("-", "_"))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(_kebab(name) for name in model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    where = _format_location(error["loc"])
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        allowed = _allowed_keys(ExperimentConfig, error["loc"])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{where}: unknown key.{hint} Allowed keys here: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"].startswith(("literal", "greater", "less", "int", "float", "string", "bool", "list", "too")):
        return f"{where}: {message} (got {error.get('input')!r})"
    return f"{where}: {message}" if where != "(top level)" else message


def _validate(raw: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration in {source}:\n  {lines}") from None


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Parse one `--set section.key=value` override; the value is read as TOML, else as a string."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set data.alpha=0.3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return [part.strip() for part in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key=value` override applied (sections created as needed)."""
    result: dict[str, Any] = _deep_copy(raw)
    for assignment in overrides:
        path, value = parse_override(assignment)
        section = result
        for part in path[:-1]:
            child = section.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
            section = child
        section[path[-1]] = value
    return result


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a TOML experiment file (or the defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        if not raw:
            raise ConfigError(
                f"{path} sets nothing (it is empty or only comments), which would run the whole default experiment: "
                'give the keys to run (see configs/), or, for the defaults on purpose, a file with name = "..." alone'
            )
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " with --set " + " ".join(overrides)
    return _validate(raw, source)


def config_from_toml(text: str, source: str) -> ExperimentConfig:
    """Parse and validate a config sent as TOML text (e.g. to a Flower client); `source` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    return _validate(raw, source)


def config_to_toml(config: ExperimentConfig) -> str:
    """The resolved config as TOML text, which `config_from_toml` and `load_config` read back."""
    return tomli_w.dumps(config_to_dict(config))


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as a kebab-case dict, ready to write back as TOML."""
    return config.model_dump(by_alias=True)
