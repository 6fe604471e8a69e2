"""The run config: one typed schema, frozen after validation, that every stage reads.

`load_config(path, overrides)` reads YAML with the safe loader, applies `--set` overrides, and
returns a `RunConfig` or raises `ConfigError` with one line per problem naming the key and the fix.
Every default lives in exactly one `Field`; its `description` is the documentation
(`configs/reference.yaml` is generated from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


TargetPreset = Literal["all-linear", "attention", "mlp"]
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class QuantizationSpec(Spec):
    bits: Literal[4, 8] = Field(4, description="4 for QLoRA (bitsandbytes 4-bit), 8 for LLM.int8 weights. Needs CUDA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 is the QLoRA paper's choice.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul."
    )


class ModelSpec(Spec):
    name: str = Field(..., description="Hub id, local model directory, or local .gguf file.")
    revision: str | None = Field(None, description="Hub branch, tag or commit; recorded in the manifest.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the frozen base weights; auto follows training.precision."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None = Field(
        None, description="Attention kernel; None lets transformers choose (sdpa where available)."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model. Only for models you trust.")
    allow_pickle_weights: bool = Field(
        False, description="Also load .bin/.pt (pickle) weights, which can run code when loaded. Default: safetensors only."
    )
    quantization: QuantizationSpec | None = Field(None, description="Load the base quantized (QLoRA). Needs CUDA.")
    chat_template: str | None = Field(
        None, description="Override the tokenizer's chat template: a built-in name (chatml, llama3, mistral) or a .jinja file."
    )
    adapter: str | None = Field(
        None,
        description="Start from a finished run's adapter (e.g. runs/sft), for preference tuning after SFT: its base "
        "fingerprint must match model.name; training continues that adapter and the reference is that SFT model.",
    )

    @property
    def is_gguf(self) -> bool:
        return self.name.lower().endswith(".gguf")


class LoraSpec(Spec):
    rank: int = Field(16, ge=1, description="LoRA rank r: the number of directions the update can use.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA). Default 2*rank."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | TargetPreset = Field(
        "all-linear", description="Linear layers to adapt: a list of names, or all-linear, attention, mlp."
    )
    target_experts: bool | Literal["auto"] = Field(
        "auto",
        description="MoE models: adapt the routed experts (fused 3-D expert weights, through PEFT's target_parameters; "
        "they take no dropout, DoRA or PiSSA). auto: yes with all-linear or mlp, no with attention or a list; "
        "false leaves them frozen. validate and train report the share of each block the targets reach.",
    )
    target_router: bool = Field(
        False, description="MoE models: also adapt the router that picks the experts (off: routing stays as pretrained)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): slower, sometimes better at low rank.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Non-LoRA modules trained in full and saved (e.g. embed_tokens, lm_head)."
    )
    train_tokens: Literal["auto", "off"] | list[str] = Field(
        "auto",
        description="Embedding rows that train with the adapter (PEFT trainable tokens). auto: the rows of stop and "
        "turn tokens (EOS, end of turn, role headers) the base never trained (near zero, or the same vector as other "
        "never-used rows), which LoRA alone cannot teach to stop; off: none; or a list of tokens.",
    )
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Initialisation of A and B; default is Kaiming A, zero B (the update starts at 0)."
    )
    task_type: Literal["CAUSAL_LM"] = Field("CAUSAL_LM", description="Accepted for PEFT compatibility; always CAUSAL_LM.")

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def scaling(self) -> float:
        return self.resolved_alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @field_validator("train_tokens", mode="before")
    @classmethod
    def _tokens_or_choice(cls, value):
        if isinstance(value, str) and value not in ("auto", "off"):
            raise ValueError(f"{value!r} is neither auto, off, nor a list of tokens such as [</s>]")
        if isinstance(value, list) and (not value or not all(isinstance(t, str) and t for t in value)):
            raise ValueError("list the tokens as non-empty strings, e.g. ['<|eot_id|>']; or use auto or off")
        return value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _list_or_preset(cls, value):
        if isinstance(value, str) and value not in ("all-linear", "attention", "mlp"):
            raise ValueError(f"{value!r} is neither a list of module names nor one of all-linear, attention, mlp")
        if isinstance(value, list) and not value:
            raise ValueError("is empty; list module names or use all-linear")
        return value


class DataSource(Spec):
    path: str = Field(..., description="Local .jsonl/.json/.csv/.parquet file, or a Hub dataset id.")
    split: str = Field("train", description="Split to read from a Hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")

    @property
    def is_local(self) -> bool:
        return Path(self.path).suffix.lower() in DATA_SUFFIXES or Path(self.path).exists()


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


CheckLevel = Literal["warn", "fail", "off"]


class DataChecksSpec(Spec):
    """What `loraft data check` and the start of `loraft train` do when a data check fires."""

    row_schema: Literal["fail"] = Field(
        "fail", description="Rows missing their format's fields, wrong types, bad chat roles: always fail (train cannot use them)."
    )
    # Not named "tokens": redact() masks any key that contains "token" in the run folder's config.yaml.
    lengths: CheckLevel = Field(
        "warn", description="Rows longer than max_seq_length, empty completions, rows with no token in the loss."
    )
    duplicates: CheckLevel = Field("warn", description="Exact and near-duplicate rows within train and within eval.")
    contradictions: CheckLevel = Field("warn", description="The same prompt with different answers.")
    chat_fields: CheckLevel = Field(
        "warn", description="Message fields (tool_calls, reasoning_content, ...) and a row's tools that the chat template does not render."
    )
    # fail: leaked eval rows make the held-out loss that train reports (base -> adapter) flatter than the truth.
    leakage: CheckLevel = Field("fail", description="Eval rows that also appear exactly (after normalising) in train.")
    # warn: near-duplicate search is a heuristic; on templated data most new rows are near a train row.
    near_leakage: CheckLevel = Field(
        "warn", description="Eval rows whose Jaccard with a train row reaches near_duplicate_threshold; each is listed beside that row."
    )
    balance: CheckLevel = Field("warn", description="Short-answer tasks where one answer dominates.")
    end_of_turn: CheckLevel = Field(
        "fail", description="Chat rows whose assistant turns do not end with a trained end-of-turn token (the model never stops)."
    )
    identical_pairs: CheckLevel = Field(
        "fail", description="Preference pairs whose chosen and rejected answers are identical: they teach nothing and add noise."
    )
    near_identical_pairs: CheckLevel = Field(
        "warn", description="Preference pairs whose chosen and rejected differ by little (near_identical_threshold); each pair is shown."
    )
    emptied_answers: CheckLevel = Field(
        "fail", description="Preference pairs where the length limits leave no token of the chosen or rejected answer."
    )
    cut_answers: CheckLevel = Field(
        "warn", description="Preference pairs whose chosen or rejected answer is cut by max_seq_length (with the share)."
    )
    pair_prompts: CheckLevel = Field(
        "fail", description="Preference pairs whose chosen and rejected render from different prompts (not a preference)."
    )
    length_bias: CheckLevel = Field(
        "warn", description="Chosen longer than rejected in more than length_bias_max_share of the pairs (the model learns 'longer')."
    )
    near_identical_threshold: float = Field(
        0.9, gt=0, le=1, description="Character similarity (difflib ratio) at which chosen and rejected count as near-identical."
    )
    length_bias_max_share: float = Field(
        0.8, gt=0.5, le=1, description="Share of pairs with the chosen answer longer (in tokens) past which length_bias fires."
    )
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity of word-bigram sets (normalised text) at which rows are near-duplicates."
    )
    balance_max_share: float = Field(
        0.7, gt=0, le=1, description="Flag a short-answer task when one answer is more than this share of the rows."
    )


class DataSpec(Spec):
    train: DataSource = Field(..., description="Training data (a path, or {path, split, subset}).")
    eval: DataSource | None = Field(None, description="Held-out data; if absent, eval_fraction of train is split off.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of train held out for eval when no eval file is given (seeded split)."
    )
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects messages / instruction+output / prompt+completion / text."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map our field names to yours, e.g. {prompt: question, completion: answer}.",
    )
    train_on: Literal["assistant", "all", "last_assistant"] = Field(
        "assistant",
        description="Tokens in the loss: assistant turns / completions only, everything, or the last assistant turn.",
    )
    packing: bool = Field(
        False, description="Pack several rows into each sequence of max_seq_length (no cross-row attention); batch_size then counts sequences."
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Unpacked batches without padding: a batch's rows run as one sequence with restarting positions (no "
        "cross-row attention): the same rows and loss per step as padded batches. auto: on where the attention kernel "
        "takes such rows as variable-length sequences (model.attn_implementation flash_attention_2/3), else padded.",
    )
    system_prompt: str | None = Field(None, description="System message put in front of prompt/completion rows.")
    checks: DataChecksSpec = Field(
        default_factory=DataChecksSpec, description="Data checks run by `loraft data check` and before training."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"train": {"path": data}}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("train", "eval"):
            if isinstance(data.get(key), str):
                data[key] = {"path": data[key]}
        # `train_on_prompt: true` is what users bring from axolotl; keep one field underneath.
        if "train_on_prompt" in data:
            flag = data.pop("train_on_prompt")
            if not isinstance(flag, bool):
                raise ValueError("train_on_prompt must be true or false")
            if flag and data.get("train_on", "all") != "all":
                raise ValueError("train_on_prompt: true contradicts train_on; keep only train_on")
            data.setdefault("train_on", "all" if flag else "assistant")
        return data

    @model_validator(mode="after")
    def _eval_source(self):
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("give either data.eval or data.eval_fraction, not both")
        return self


PreferenceMethod = Literal["dpo", "kto"]


class TrainingSpec(Spec):
    method: Literal["sft"] | PreferenceMethod = Field(
        "sft",
        description="sft: supervised (rows with answers). dpo: pairs prompt/chosen/rejected (Rafailov 2023). kto: unpaired "
        "prompt/completion/label (Ethayarajh 2024). Preference methods train the adapter against the base with the "
        "adapter disabled (or model.adapter's SFT model); their keys are under preference.",
    )
    epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Rows per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up (ignored if warmup_steps).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in optimizer steps; overrides warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"] = Field(
        "auto", description="Optimizer; auto is AdamW (fused kernel on CUDA, same math). 8-bit ones need bitsandbytes and CUDA."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward (far less memory, ~30% slower). auto: on a GPU, checkpoint only "
        "as many layers as memory_budget_gib needs (all of them on a small card); on a CPU, none. true: every layer.",
    )
    memory_budget_gib: float | None = Field(
        None, gt=0, description="GPU memory gradient_checkpointing: auto plans for; default 90% of the card."
    )
    activation_offloading: bool = Field(
        False, description="Move saved activations to CPU memory during forward (CUDA): less GPU memory, a little slower."
    )
    fused_lora: bool = Field(
        True,
        description="Run each plain LoRA projection as one fused autograd op (dropout, low-rank product and add in as few "
        "memory passes as possible; no dropout masks kept; on CUDA, Triton kernels that recompute the mask instead of "
        "storing it). Same math as PEFT's forward; false uses PEFT's.",
    )
    lora_kernels: Literal["auto", "triton", "torch"] = Field(
        "auto",
        description="How fused_lora runs dropout. auto: Triton kernels on CUDA when triton is installed (the mask is "
        "recomputed, never stored), torch ops elsewhere; triton: insist on them; torch: torch ops only.",
    )
    liger: bool | Literal["auto"] = Field(
        "auto",
        description="Liger Kernel fused ops (RMSNorm, SwiGLU, RoPE, linear+cross-entropy without materialised logits); "
        "auto: on when CUDA and liger-kernel are available. Same math, less memory, faster.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision; auto is bf16 on a GPU that supports it, else fp32."
    )
    max_seq_length: int = Field(2048, ge=8, description="Longest tokenized row; longer rows are truncated.")
    seed: int = Field(42, description="Seed for data order, dropout and LoRA initialisation.")
    logging_steps: int = Field(10, ge=1, description="Log train loss every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; default once per epoch when eval data exists.")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps; default once per epoch.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without eval-loss improvement."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers; none by default."
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop the run, or skip that optimizer step."
    )
    max_skipped_steps: int = Field(10, ge=0, description="With nan_policy: skip, stop after skipping more steps than this.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_precision_flags(cls, data: Any) -> Any:
        # `bf16: true` / `fp16: true` are what HF users write; they are the same single choice as `precision`.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        chosen = [name for name in ("bf16", "fp16") if data.pop(name, False) is True]
        if len(chosen) > 1:
            raise ValueError("bf16 and fp16 are both true; set precision: bf16 or precision: fp16")
        if chosen:
            if data.get("precision", chosen[0]) not in (chosen[0], "auto"):
                raise ValueError(f"{chosen[0]}: true contradicts precision: {data['precision']}; keep only precision")
            data["precision"] = chosen[0]
        return data

    @model_validator(mode="after")
    def _eval_needs_steps(self):
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("early_stopping_patience needs training.eval_steps (evaluations to count)")
        return self


class DpoSpec(Spec):
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the adapter may move from the reference (higher: less).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (Azar 2023); hinge: SLiC; robust: noise-robust DPO; sigmoid_norm: "
        "length-normalised DPO (TRL loss_type)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (conservative DPO / robust); 0 is plain DPO."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an added negative log-likelihood loss on the chosen answers (RPO, Pang 2024; "
        "TRL loss_type sft): keeps chosen log-probabilities from falling with the rejected ones; 0 is off."
    )


class KtoSpec(Spec):
    beta: float = Field(0.1, gt=0, description="KTO temperature (higher: the adapter stays closer to the reference).")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of label: true rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of label: false rows.")


class PreferenceSpec(Spec):
    """Keys of the preference methods (training.method); the section of another method may not be set."""

    max_prompt_length: int | None = Field(
        None, ge=1, description="Keep at most this many prompt tokens (the end of the prompt); null keeps prompts whole "
        "and a pair whose prompt fills max_seq_length is reported as emptied."
    )
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="training.method: dpo.")
    kto: KtoSpec = Field(default_factory=KtoSpec, description="training.method: kto.")


DeploymentTarget = Literal["vllm", "sglang", "llamacpp", "ollama", "merged", "transformers"]


class ServingSpec(Spec):
    merge_adapter: bool = Field(False, description="Recorded for `loraft merge`: the adapter is meant to be merged.")
    deployment: DeploymentTarget | list[DeploymentTarget] = Field(
        "transformers",
        description="Where the adapter will be served (one or a list): vllm, sglang, llamacpp, ollama, merged, transformers. "
        "validate and train check each engine's rules before training; loraft export --to TARGET writes what it loads.",
    )
    quantization: Literal["none"] = Field("none", description="Post-merge quantization (none; quantize with your server's tools).")

    @field_validator("deployment")
    @classmethod
    def _some_target(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("is empty; name a target (vllm, sglang, llamacpp, ollama, merged, transformers)")
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.deployment,) if isinstance(self.deployment, str) else tuple(dict.fromkeys(self.deployment))


class DistributedSpec(Spec):
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="How `--gpus N` spreads training: data parallel, FSDP full-shard, or DeepSpeed ZeRO."
    )
    fsdp_cpu_ram_efficient_loading: bool = Field(
        True, description="FSDP: only rank 0 reads the weights from disk, the others receive them (saves host RAM)."
    )
    fsdp_offload_params: bool = Field(False, description="FSDP: keep sharded parameters in CPU memory (slow, fits more).")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="accelerate's mixed precision; auto follows training.precision."
    )


# The advice rules (lora_ft/training/advice.py), by the name a user turns one off with.
AdviceRule = Literal["learning_rate", "rank", "targets", "batch", "alpha", "epochs"]


class AdviceSpec(Spec):
    off: list[AdviceRule] = Field(
        default_factory=list,
        description="Advice lines to silence, by name: learning_rate (vs LoRA Without Regret's formula), rank (LoRA "
        "parameters vs supervised tokens), targets (attention-only, frozen experts), batch (effective batch > 32), "
        "alpha (scale vs the 32/r the formula assumes), epochs (likely overfit). Advice never blocks a run.",
    )


class RunConfig(Spec):
    model: ModelSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec | None = Field(None, description="Needed by train; validate accepts a config without it.")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    preference: PreferenceSpec = Field(
        default_factory=PreferenceSpec, description="Preference tuning (training.method dpo or kto)."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    advice: AdviceSpec = Field(
        default_factory=AdviceSpec, description="What validate and train advise before the run, and train and inspect after it."
    )
    output_dir: str | None = Field(None, description="Run folder; default runs/<config file name>.")

    @model_validator(mode="after")
    def _combinations(self):
        q = self.model.quantization
        if q is not None and self.lora.init in ("pissa", "olora"):
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights and cannot run on a quantized base")
        if q is not None and self.training.precision == "fp32" and q.compute_dtype != "float32":
            raise ValueError("training.precision: fp32 with a 4-bit base; set model.quantization.compute_dtype: float32")
        if self.model.dtype == "float16" and self.training.precision == "bf16":
            raise ValueError("model.dtype float16 with precision bf16; choose one half-precision type")
        self._preference_combinations()
        return self

    def _preference_combinations(self) -> None:
        method = self.training.method
        # Compared with the defaults, not with what was written: the run folder's config.yaml lists every key.
        defaults = PreferenceSpec()
        for name in ("dpo", "kto"):
            if getattr(self.preference, name) != getattr(defaults, name) and name != method:
                raise ValueError(f"preference.{name} is set but training.method is {method}; "
                                 f"remove preference.{name} or set training.method: {name}")
        if method == "sft":
            if self.preference != defaults:
                raise ValueError("preference is set but training.method is sft; set training.method: dpo or kto")
            if self.model.adapter is not None:
                raise ValueError("model.adapter (start from a finished run's adapter) needs training.method: dpo or kto")
            return
        if self.lora.init in ("pissa", "olora"):
            raise ValueError(
                f"lora.init: {self.lora.init} with training.method: {method}: the reference would be the model with the "
                f"adapter disabled, which {self.lora.init} turns into the residual W minus its principal part, not the "
                "original model; use lora.init: default (or gaussian)"
            )
        if self.data is not None and self.data.packing:
            raise ValueError(f"data.packing with training.method: {method}: pairs are scored whole; set data.packing: false")
        if self.data is not None and self.data.train_on != "assistant":
            raise ValueError(f"data.train_on: {self.data.train_on} with training.method: {method}: the preference loss is "
                             "on the answers only; remove data.train_on")
        if self.data is not None and self.data.format not in ("auto",):
            raise ValueError(f"data.format: {self.data.format} with training.method: {method}: preference rows have their "
                             "own formats (prompt/chosen/rejected, prompt/completion/label); use data.format: auto")
        if method == "kto" and self.training.batch_size < 2:
            raise ValueError("training.batch_size 1 with training.method: kto: KTO estimates its KL term from the other "
                             "rows of a batch; set training.batch_size: 2 or more")
        if self.training.early_stopping_patience is not None:
            raise ValueError(f"training.early_stopping_patience with training.method: {method}: the preference eval "
                             "loss is not comparable to SFT's; remove it")
