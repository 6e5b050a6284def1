"""TrialConfig: everything one trial needs, as typed dataclasses (the help text is the docstrings).

A trial is a pure function of this config; `duetto train` and the sweeps both build one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from duetto.config import ConfigError


@dataclass
class DataPaths:
    train: str = "duetto-runs/data/train.jsonl"
    """Unified JSONL written by `duetto data prepare` (instruction, input, response)."""
    test: str = "duetto-runs/data/test.jsonl"
    """Held-out split: eval_loss and the generation metrics are computed on it (unless val_size is set)."""
    limit_train: int = 0
    """Use only the first N training rows (0 = all). For smoke runs."""
    val_size: float = 0
    """Hold out the last rows of the training file as a validation split and evaluate on it instead
    of the test split: a fraction (< 1) or a row count. Sweeps choose their best trials on it, so the
    test split stays unseen until the report. 0 = evaluate on the test split."""


@dataclass
class GaloreOptions:
    rank: int = 128
    """Rank of the gradient projection (GaLore `rank`)."""
    update_proj_gap: int = 200
    """Steps between recomputing the projection (SVD)."""
    scale: float = 0.25
    """Scale applied to the projected update (GaLore `scale`)."""
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    """Which side to project (GaLore `proj_type`)."""
    layerwise: bool = True
    """galore_adamw_8bit_layerwise: optimizer steps inside backward hooks, lowest memory; one worker, no grad accumulation."""
    target_modules: list[str] = field(default_factory=lambda: ["self_attn", "mlp"])
    """Module-name substrings or regexes (HF `optim_target_modules`): matching Linear weights get GaLore projection, the rest plain 8-bit AdamW."""


@dataclass
class QloraOptions:
    bits: Literal[4, 8] = 8
    """Base weights through bitsandbytes: 8 = LLM.int8 (the study), 4 = NF4 with double quantization."""
    r: int = 4
    """LoRA rank."""
    alpha: int = 8
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get LoRA adapters ("all-linear" is accepted as one entry)."""
    upcast_fp32: bool = True
    """PEFT's `prepare_model_for_kbit_training` casts every weight left unquantized (embeddings, norms,
    a tied LM head) to fp32. false keeps them in the compute dtype: 2 bytes less per such weight
    (0.6 GiB for gemma-3-1b's 262k x 1152 embedding), at the cost of bf16 norms. No effect where the
    weights are fp32 anyway (CPU, precision bf16-mixed)."""


@dataclass
class EvalOptions:
    num_examples: int = 200
    """Generate for the first N test rows (0 = the whole test split)."""
    max_new_tokens: int = 64
    """Generation budget per response."""
    batch_size: int = 0
    """Prompts per generate() call; 0 = 256 on a GPU (decoding is launch-bound there: on an H100 a call of
    128 rows took 1.29 s, one of 32 rows 1.23 s), 16 on CPU; in a pack's shared calls 0 means that many
    rows of each trial a call (fewer where GPU memory would not hold them), a set value the rows of a call."""
    loss_examples: int = 0
    """Rows of the test split used for eval_loss (0 = the whole test split)."""


@dataclass
class ScalingOptions:
    num_workers: int | Literal["auto"] = "auto"
    """Ray Train workers (DDP ranks); layer-wise GaLore needs at most 1. 0 = Ray Train local mode: the trial
    runs in the calling process, with no Ray to start and no worker process (about 20 s less per trial).
    auto = local mode, unless a Ray cluster is joined (RAY_ADDRESS set, or inside `ray job submit`): then
    1 worker on that cluster."""
    use_gpu: bool | None = None
    """Train on GPUs; null = yes when the Ray cluster has GPUs."""
    gpus_per_worker: float = 1.0
    """GPU share per worker; fractions let several trials share one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""

    def workers(self) -> int:
        """num_workers with auto resolved for this process."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        import os

        return 1 if os.environ.get("RAY_ADDRESS") else 0


@dataclass
class TrialConfig:
    method: Literal["galore", "qlora", "baseline"] = "qlora"
    """Fine-tuning method; `baseline` evaluates the base model untouched through the same path (no training)."""
    model: str = "smollm2-135m-instruct"
    """Base model: a Hugging Face id, a local path, or a `duetto model fetch` name (or `tiny`)."""
    data: DataPaths = field(default_factory=DataPaths)
    template: Literal["study", "chat"] = "study"
    """Prompt template: the study's Instruction/Input/Response text, or the model's chat template."""
    max_seq_len: int = 128
    """Tokens per example; longer prompts are cut before the response (and counted)."""
    batch_size: int = 2
    """Examples per device per step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (not allowed with layerwise GaLore)."""
    learning_rate: float = 2e-5
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """transformers scheduler name (linear, cosine, constant, ...)."""
    warmup_ratio: float = 0.0
    """Fraction of steps for linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: float = 2.0
    """Passes over the training data (ignored when max_steps >= 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = use epochs; 0 = no training (the baseline)."""
    seed: int = 42
    """Seed for data order, LoRA init and sampling."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory. Packed trials (`duetto sweep` packing) run without
    it: a pack sizes itself from the memory its steps take."""
    precision: Literal["auto", "bf16", "bf16-mixed", "fp32"] = "auto"
    """bf16 = bf16 weights and compute (least memory; updates below bf16's resolution are lost);
    bf16-mixed = fp32 weights with bf16 autocast; auto = bf16 on GPU, fp32 on CPU. No fp16: Gemma 3 overflows."""
    cuda_graphs: bool | None = None
    """The GPU fast path: each step's forward and backward replayed as one CUDA graph, GaLore's optimizer
    stepped in fused groups, no host wait between steps (same math, schedule, data order and checkpoints).
    null = on when the trial trains on one CUDA GPU without gradient accumulation; false = the plain HF
    Trainer step (and bitsandbytes' own LLM.int8 matmul, which the fast path replaces with a static-shape
    version of the same matmul for qlora.bits=8). Packed trials (packing: qlora) share it: their pack's
    forward and backward replay as a CUDA graph on a GPU unless it is false."""
    compile: bool = False
    """torch.compile the model (HF `torch_compile`): fewer Python-issued kernels per step, slower first steps.
    Every batch is then padded to max_seq_len, so the compiled graph sees one shape."""
    logging_steps: int = 10
    """Steps between loss logs."""
    report_every_steps: int = 0
    """Steps between Ray Train reports with a checkpoint (0 = once per epoch); ASHA decides on these."""
    interim_eval_examples: int = 16
    """Test rows generated at each interim report so BLEU/ROUGE can drive early stopping (0 = loss only)."""
    max_failures: int = 1
    """Ray Train retries of a failed worker group; a retry resumes from the last reported checkpoint."""
    output_dir: str = "duetto-runs/trial"
    """Where model/, config.yaml and metrics.json are written."""
    galore: GaloreOptions = field(default_factory=GaloreOptions)
    qlora: QloraOptions = field(default_factory=QloraOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)

    def validate(self) -> None:
        if self.data.val_size < 0 or (self.data.val_size >= 1 and self.data.val_size != int(self.data.val_size)):
            raise ConfigError(f"data.val_size: a fraction in [0, 1) or a whole row count, got {self.data.val_size}")
        if self.batch_size < 1:
            raise ConfigError("batch_size: must be >= 1")
        if self.max_seq_len < 8:
            raise ConfigError("max_seq_len: must be >= 8")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate: must be > 0")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("gradient_accumulation_steps: must be >= 1")
        workers = self.scaling.num_workers
        if workers != "auto" and workers < 0:
            raise ConfigError("scaling.num_workers: must be >= 0 (0 = local mode, in-process) or auto")
        if self.max_steps < -1:
            raise ConfigError("max_steps: -1 (use epochs), 0 (baseline, no training) or a positive count")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError("epochs: must be > 0 when max_steps is -1")
        if self.method == "baseline" and self.max_steps != 0:
            raise ConfigError("max_steps: the baseline method trains nothing; set max_steps: 0")
        if self.method == "galore" and self.galore.layerwise:
            # The layer-wise optimizer steps each parameter inside its backward hook, so there is no
            # moment where gradients of several micro-batches (or of several DDP ranks) could be summed.
            if workers != "auto" and workers > 1:
                raise ConfigError("scaling.num_workers: layer-wise GaLore updates weights during backward, so it "
                                  "cannot all-reduce gradients across DDP workers; use 1 worker or set "
                                  "galore.layerwise=false")
            if self.gradient_accumulation_steps != 1:
                raise ConfigError("gradient_accumulation_steps: layer-wise GaLore steps each weight as soon as "
                                  "its gradient exists, so gradients cannot accumulate; use 1 or set "
                                  "galore.layerwise=false")
        if self.galore.rank < 1 or self.galore.update_proj_gap < 1:
            raise ConfigError("galore.rank and galore.update_proj_gap: must be >= 1")
        if self.qlora.r < 1:
            raise ConfigError("qlora.r: must be >= 1")
        if not 0.0 <= self.qlora.dropout < 1.0:
            raise ConfigError("qlora.dropout: must be in [0, 1)")
        if self.scaling.gpus_per_worker <= 0 or self.scaling.cpus_per_worker <= 0:
            raise ConfigError("scaling.gpus_per_worker / cpus_per_worker: must be > 0")
