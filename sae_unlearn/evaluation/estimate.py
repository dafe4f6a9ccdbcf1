"""A measured time estimate for `compare` / `demo`: a few seconds of throughput probing on the run's own
model, SAEs, device and compute dtype, multiplied by the work each stage will do under the run's settings.

The work model counts, per stage, what the code paths in features/, methods/ and evaluation/ run:
    forward tokens      the decoder body without the lm_head (no gradient)
    lm_head rows        positions whose logits are computed (Gemma 3's 262k-row lm_head dominates them)
    SAE tokens          tokens passed through every loaded SAE's encoder (statistics, hooks, re-activation)
    train tokens        forward + backward through the body with a hidden-state loss (CRISP, RMU)
    LM train tokens     LoRA forward + backward with NPO's next-token loss (chunked, checkpointed lm_head)
    attack tokens       the relearning attacks' training tokens (LoRA and full fine-tunes apart, each batch
                        padded to its longest text) and forward tokens, on their float32 copies
    generated tokens    greedy decoding steps times the batch (fluency samples and checks)
Token counts come from tokenizing the pack's texts with the run's truncation lengths, so they follow
every setting (steps, batch sizes, max lengths, probe counts, attacks); nothing is a fixed constant.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_unlearn.concepts.pack import ConceptPack, Probe
from sae_unlearn.evaluation.adversarial import adversarial_probes
from sae_unlearn.evaluation.evaluate import GENERIC_TEXT, select_probes
from sae_unlearn.evaluation.relearning import Attack, attack_step, attacked_copy, trainable_for_attack
from sae_unlearn.evaluation.scoring import letter_prompt, question_prompt
from sae_unlearn.features import FeatureSelection, SelectedFeature
from sae_unlearn.features.statistics import stats_cache_path
from sae_unlearn.methods import METHODS, method_config
from sae_unlearn.methods.npo import token_logprobs
from sae_unlearn.methods.unlikelihood import opening_words
from sae_unlearn.models.batch import Batch
from sae_unlearn.models.generation import generate
from sae_unlearn.models.hooks import decoder_body, lm_head_logits
from sae_unlearn.models.loading import LoadedModel
from sae_unlearn.saes.loading import LoadedSAE

if TYPE_CHECKING:
    from sae_unlearn.evaluation.compare import CompareConfig

PROBE_BATCH, PROBE_LENGTH = 2, 128  # the stages' sequence length; a small batch keeps the probe to seconds
PPL_MAX_LENGTH = 256  # text_metrics.perplexity and feature_levels read this many tokens per text
LETTER_PERMUTATIONS = 4  # evaluation.scoring.letter_choices: cyclic rotations of the options
FLUENCY_CHECK_TOKENS = 32  # methods.fluency_check.FluencyCheck
TIMED_STEPS = range(1, 3)  # the training steps timed (the first one pays one-time costs, so is left out)


@dataclass
class Throughput:
    """Measured rates (per second) in the run's compute dtype on its device."""

    forward_tokens: float
    lm_head_rows: float
    sae_tokens: float
    train_tokens: float
    lm_train_tokens: float
    generated_tokens: float
    attack_train_tokens: float = math.inf
    full_attack_train_tokens: float = math.inf
    attack_forward_tokens: float = math.inf
    dtype: str = ""
    device: str = ""
    probe_seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per optimizer step of each training stage, timed on the method's own training (steps
    `TIMED_STEPS` of a short run); such a stage is estimated from it rather than from the token rates."""


@dataclass
class Work:
    """What one stage runs, in the units the throughput probe measures."""

    forward_tokens: float = 0.0
    lm_head_rows: float = 0.0
    sae_tokens: float = 0.0
    train_tokens: float = 0.0
    lm_train_tokens: float = 0.0
    generated_tokens: float = 0.0
    attack_train_tokens: float = 0.0
    full_attack_train_tokens: float = 0.0
    attack_forward_tokens: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, factor: float) -> Work:
        return Work(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def seconds(self, rates: Throughput) -> float:
        return sum(getattr(self, f.name) / getattr(rates, f.name) for f in fields(self) if getattr(self, f.name))


@dataclass
class TrainingPlan:
    """A training stage: `steps` optimizer steps of `step` work, the frozen model's `frozen` work added to
    each of the first `frozen_steps` (its states are cached after them), and `rest` (fluency checks)."""

    steps: int
    step: Work
    frozen: Work
    frozen_steps: int
    rest: Work

    @property
    def work(self) -> Work:
        return self.step * self.steps + self.frozen * self.frozen_steps + self.rest

    def seconds(self, rates: Throughput, step_seconds: float | None = None) -> float:
        """At the token rates, or with each step taking `step_seconds` as timed at steps `TIMED_STEPS` (the
        frozen work in them taken out and added back where the plan has it)."""
        if step_seconds is None:
            return self.work.seconds(rates)
        frozen = self.frozen.seconds(rates)
        in_timed = sum(i < self.frozen_steps for i in TIMED_STEPS) / len(TIMED_STEPS)
        bare = max(0.0, step_seconds - frozen * in_timed)
        return bare * self.steps + frozen * self.frozen_steps + self.rest.seconds(rates)


@dataclass
class StageEstimate:
    stage: str  # the key compare() writes in results.json "seconds" (evaluations: each result's "seconds")
    seconds: float
    work: Work


# -- throughput probe ---------------------------------------------------------------------------------


def _rate(fn: Callable[[], Any], units: float, budget_s: float, min_calls: int = 3) -> float:
    """units / second of `fn`: one untimed warm-up call, then at least `min_calls` timed calls and until
    `budget_s` has passed; the median call counts, so one preempted or slow first call does not decide."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget_s:
        call = time.perf_counter()
        fn()
        times.append(time.perf_counter() - call)
    return units / statistics.median(times)


def _lora_copy(loaded: LoadedModel) -> Any:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(loaded.model)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(n for n in names if n.endswith(("proj", "c_attn", "c_proj", "c_fc")) and n != "lm_head")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)).train()


def _train_rates(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, budget_s: float) -> tuple[float, float]:
    """Tokens per second of a LoRA step with a hidden-state loss and with NPO's next-token loss, on a copy."""
    lora = _lora_copy(loaded)
    lora_body = decoder_body(lora)
    batch = Batch(ids, mask, torch.ones_like(ids, dtype=torch.bool))

    def train_step() -> None:
        out = lora_body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()

    def lm_train_step() -> None:  # NPO's loss path: the lm_head in chunks under activation checkpointing
        logp, _ = token_logprobs(lora, batch)
        (-logp.mean()).backward()

    return _rate(train_step, ids.numel(), budget_s), _rate(lm_train_step, ids.numel(), budget_s)


@dataclass
class AttackProbe:
    """The relearning attacks to time: the grid's first attack of each kind (LoRA, full fine-tune), each on
    its own texts, on copies in `dtype` under `autocast` (relearning.attacked_copy)."""

    attacks: list[tuple[Attack, list[str]]]
    dtype: str = "float32"
    autocast: str = "auto"


def _timed_steps(step: Callable[[], Any]) -> list[float]:
    """Seconds of steps `TIMED_STEPS` of `step` called in order (step 0 pays the one-time costs)."""
    stamps = [time.perf_counter()]
    for _ in range(max(TIMED_STEPS) + 1):
        step()
        stamps.append(time.perf_counter())
    return [stamps[i + 1] - stamps[i] for i in TIMED_STEPS]


def _attack_rates(
    loaded: LoadedModel,
    attack: Attack,
    texts: Sequence[str],
    probe: AttackProbe,
    ids: torch.Tensor,
    mask: torch.Tensor,
    budget_s: float,
) -> tuple[float, float]:
    """(padded tokens per second of `attack`'s own steps on `texts`, eval forward tokens per second) on a
    copy made as the attacks make it."""
    with torch.random.fork_rng(devices=[]), attacked_copy(loaded, None, probe.dtype, probe.autocast) as base:
        model, opt = trainable_for_attack(base, attack)
        rng, read = random.Random(0), []
        seconds = _timed_steps(lambda: read.append(attack_step(model, opt, loaded.tokenizer, texts, attack, rng)))
        model.eval()
        with torch.no_grad():
            forward_rate = _rate(lambda: model(input_ids=ids, attention_mask=mask).logits, ids.numel(), budget_s)
    return sum(read[i] for i in TIMED_STEPS) / sum(seconds), forward_rate


def probe_throughput(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    budget_s: float = 0.4,
    attack: AttackProbe | None = None,
    train_rates: bool = True,
) -> Throughput:
    """Measure each rate on the run's own model and SAEs (seconds in all; the model is not changed). With
    `attack`, its training rate comes from real attack steps (evaluation/relearning.py's `attack_step` on a
    copy made as the attacks make it, its texts padded as they are) and its forward rate from that copy.
    `train_rates` False: no synthetic training steps (a caller that times each method's own steps)."""
    started = time.perf_counter()
    device = loaded.device
    vocab = int(loaded.model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(10, vocab - 1), vocab, (PROBE_BATCH, PROBE_LENGTH), generator=gen).to(device)
    mask = torch.ones_like(ids)
    tokens = ids.numel()
    body = decoder_body(loaded.model)
    with torch.no_grad():

        def forward() -> torch.Tensor:
            return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

        forward_rate = _rate(forward, tokens, budget_s)
        hidden = forward().reshape(tokens, -1)
        lm_head_rate = _rate(lambda: lm_head_logits(loaded.model, hidden), tokens, budget_s)
        sae_rate = (
            _rate(lambda: [s.sae.encode(hidden.to(s.sae.W_enc.dtype)) for s in saes], tokens, budget_s)
            if saes
            else math.inf
        )
        prompts = [loaded.tokenizer.decode(row[:16], skip_special_tokens=True) for row in ids.tolist()] * 4
        new_tokens = 16
        generation_rate = _rate(
            lambda: generate(loaded.model, loaded.tokenizer, prompts, new_tokens, stop_at_eos=False),
            len(prompts) * new_tokens,
            budget_s,
        )
    train_rate, lm_train_rate = _train_rates(loaded, ids, mask, budget_s) if train_rates else (math.inf, math.inf)
    attack_rates = (
        {a.kind: _attack_rates(loaded, a, texts, attack, ids, mask, budget_s) for a, texts in attack.attacks}
        if attack
        else {}
    )
    attack_forward_rate = next(iter(attack_rates.values()), (math.inf, math.inf))[1]
    return Throughput(
        forward_tokens=forward_rate,
        lm_head_rows=lm_head_rate,
        sae_tokens=sae_rate,
        train_tokens=train_rate,
        lm_train_tokens=lm_train_rate,
        generated_tokens=generation_rate,
        attack_train_tokens=attack_rates.get("lora", (math.inf,))[0],
        full_attack_train_tokens=attack_rates.get("full", (math.inf,))[0],
        attack_forward_tokens=attack_forward_rate,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(device),
        probe_seconds=round(time.perf_counter() - started, 1),
    )


def _probe_features(saes: Sequence[LoadedSAE], per_layer: int, concept: str) -> FeatureSelection:
    """`per_layer` latents on every loaded SAE: a stand-in for the selection the run will make (a step's
    cost does not depend on which latents it suppresses)."""
    chosen = [
        SelectedFeature(s.layer, i, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        for s in saes
        for i in range(min(per_layer, int(s.sae.W_enc.shape[1])))
    ]
    return FeatureSelection("", "", [], concept, "", "time estimate", {}, {}, "", chosen)


def method_step_seconds(
    method: str,
    options: dict[str, Any],
    loaded: LoadedModel,
    pack: ConceptPack,
    saes: Sequence[LoadedSAE],
    features_per_layer: int,
) -> float:
    """Seconds per optimizer step of `method`'s own training under `options`: its `run` for a few steps into
    a temporary directory (no fluency checks or checkpoints), timed at steps `TIMED_STEPS` by its progress
    callback. `run` leaves the model as it found it, and the global RNG is restored after it."""
    from sae_unlearn.methods.base import MethodContext

    cfg = method_config(method, options)
    short = {"steps": max(TIMED_STEPS) + 1, "epochs": None, "fluency_every": 0, "checkpoint_every": 0}
    cfg = replace(cfg, **{k: v for k, v in short.items() if hasattr(cfg, k)})
    features = _probe_features(saes, features_per_layer, pack.name) if METHODS[method].needs_saes else None
    stamps: dict[int, float] = {}

    def progress(step: int, steps: int, terms: dict[str, float]) -> None:
        stamps[step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        ctx = MethodContext(loaded, pack, Path(tmp), saes=list(saes), features=features, progress=progress)
        METHODS[method](cfg).run(ctx)
    # progress(k) is called after step k-1 (0-based) ends: step i ran between progress(i) and progress(i+1)
    return statistics.median(stamps[i + 1] - stamps[i] for i in TIMED_STEPS)


# -- stage plan ---------------------------------------------------------------------------------------


class _Lengths:
    """Token lengths of texts under the tokenizer (memoised: the plan reads the same texts many times)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, text: str, max_length: int | None = None) -> int:
        if text not in self.cache:
            self.cache[text] = len(self.tokenizer(text).input_ids)
        n = self.cache[text]
        return min(n, max_length) if max_length else n

    def total(self, texts: Sequence[str], max_length: int | None = None) -> int:
        return sum(self(t, max_length) for t in texts)

    def mean(self, texts: Sequence[str], max_length: int | None = None) -> float:
        return self.total(texts, max_length) / max(1, len(texts))


def _logprob_work(probes: Sequence[Probe], n: _Lengths) -> Work:
    """option_logprobs: each question once, its options on the shared cache; logits at the option tokens."""
    option_tokens = sum(n(" " + o) - 1 for p in probes for o in p.options)  # minus the BOS a bare encode adds
    return Work(
        forward_tokens=n.total([question_prompt(p) for p in probes]) + option_tokens, lm_head_rows=option_tokens
    )


def _letter_work(probes: Sequence[Probe], n: _Lengths) -> Work:
    prompts = [letter_prompt(p, p.options) for p in probes]
    return Work(forward_tokens=LETTER_PERMUTATIONS * n.total(prompts), lm_head_rows=LETTER_PERMUTATIONS * len(prompts))


def _ppl_work(texts: Sequence[str], n: _Lengths, max_length: int = PPL_MAX_LENGTH) -> Work:
    tokens = n.total(texts, max_length)
    return Work(forward_tokens=tokens, lm_head_rows=tokens)


def _generation_work(prompts: Sequence[str], new_tokens: int) -> Work:
    """generate(): one batched decoding step per new token (the probe's rate includes the prompts' prefill)."""
    return Work(generated_tokens=len(prompts) * new_tokens)


def _fluency_work(prompts: Sequence[str], new_tokens: int, n: _Lengths) -> Work:
    """fluency_metrics: the base model scores prompt + continuation."""
    scored = n.total(prompts) + len(prompts) * new_tokens
    return Work(forward_tokens=scored, lm_head_rows=scored)


def _statistics_work(texts: Sequence[str], n: _Lengths, max_length: int, trunk: float) -> Work:
    """A forward stopped at the deepest SAE layer (`trunk` of the body), then every SAE encodes each token."""
    tokens = n.total(texts, max_length)
    return Work(forward_tokens=tokens * trunk, sae_tokens=tokens)


def _training_plan(
    method: str, options: dict[str, Any], loaded: LoadedModel, pack: ConceptPack, n: _Lengths, trunk: float
) -> TrainingPlan | None:
    """What `method`'s `run` trains under `options`; None for an intervention (it only writes its artifact)."""
    training = METHODS[method].training_work(method_config(method, options), loaded, pack)
    if training is None:
        return None
    forget, retain = pack.forget_split("train"), pack.retain_split("train")
    steps, batch, max_length = int(training.steps), int(training.batch_size), int(training.max_length)
    forget_batch = batch * n.mean(forget, max_length)
    retain_batch = batch * n.mean(retain, max_length) if training.retain else 0.0
    coherence = n.mean(pack.coherence, max_length) if training.coherence else 0.0
    trained = (forget_batch + retain_batch) * training.depth + coherence
    step = Work(
        train_tokens=0.0 if training.next_token_loss else trained,
        lm_train_tokens=trained if training.next_token_loss else 0.0,
        sae_tokens=forget_batch if training.sae_forget else 0.0,
        lm_head_rows=2 * training.kl_positions,
    )
    if training.generated_tokens:  # continuations of paragraph openings, then read with gradient
        generated = batch * training.generated_tokens
        openings = [opening_words(text, training.generation_prompt_words) for text in forget]
        read = generated + batch * n.mean(openings, max_length)
        step = step + Work(generated_tokens=generated, train_tokens=read)
    first_epoch = min(steps, max(1, len(forget) // batch))  # the frozen states cached after it
    if training.frozen_states == "retain_each_step":
        frozen, frozen_steps = Work(forward_tokens=retain_batch * training.depth), steps
    elif training.frozen_states == "forget_logprobs_first_epoch":
        frozen, frozen_steps = Work(forward_tokens=forget_batch, lm_head_rows=forget_batch), first_epoch
    else:  # FrozenReference
        frozen, frozen_steps = Work(forward_tokens=(forget_batch + retain_batch) * trunk + coherence), first_epoch
    rest = Work()
    if training.fluency_every:
        checks = steps // training.fluency_every + 1  # one for the base model's own continuations
        prompts = pack.prompt_split("tune")
        check = _generation_work(prompts, FLUENCY_CHECK_TOKENS) + _fluency_work(prompts, FLUENCY_CHECK_TOKENS, n)
        rest = check * checks
    return TrainingPlan(steps, step, frozen, frozen_steps, rest)


def _evaluation_work(
    name: str,
    method: str,
    loaded: LoadedModel,
    pack: ConceptPack,
    cfg: CompareConfig,
    n: _Lengths,
    trunk: float,
    with_base_levels: bool,
) -> Work:
    ev = cfg.eval
    probes = select_probes(pack, None, ev)
    targets = [p for p in probes if p.ring == "target"]
    hooked = Work()  # forward work that runs with the run's SAE hooks installed, for a method installed as hooks
    hooked += _logprob_work(probes, n)
    if ev.letter:
        hooked += _letter_work(probes, n)
    generic = [p.strip() for p in GENERIC_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for texts in (pack.retain_split("heldout"), generic, pack.forget_split("heldout")):
        hooked += _ppl_work(texts[: ev.max_ppl_texts], n)
    prompts = [pack.coherence[:8], pack.prompt_split(ev.probe_split)]
    for ps in prompts:
        hooked += _generation_work(ps, ev.fluency_tokens)
    work = hooked
    for ps in prompts:  # scored by the base model, hooks removed
        work += _fluency_work(ps, ev.fluency_tokens, n)
    cls = METHODS.get(method)  # None: the base model
    if cls is not None and cls.needs_saes:
        levels = _statistics_work(pack.forget_split("heldout"), n, PPL_MAX_LENGTH, trunk)
        work += levels * (2 if with_base_levels else 1)
    if cls is not None and cls.hooks_saes:  # every hooked token passes the SAEs at the edited layers
        work += Work(sae_tokens=hooked.forward_tokens + hooked.generated_tokens)
    if targets and ev.adversarial_for(name):
        for variant in adversarial_probes(targets, pack.probe_split("tune")).values():
            work += _logprob_work(variant, n)
    if targets and ev.relearning_for(name):
        work += _relearning_work(pack, targets, cfg, n, base_reference=name == "base")
    return work


def padded_batch_tokens(lengths: Sequence[int], batch: int) -> float:
    """Expected tokens of a batch of `batch` texts drawn without replacement and padded to the longest: the
    k-th shortest is the longest with probability C(k-1, b-1) / C(N, b)."""
    ordered, b = sorted(lengths), min(batch, len(lengths))
    expected_max = sum(n * math.comb(k, b - 1) for k, n in enumerate(ordered)) / math.comb(len(ordered), b)
    return b * expected_max


def _attack_split(pack: ConceptPack, targets: Sequence[Probe], cfg: CompareConfig) -> tuple[Any, Any, list[str]]:
    """(relearn config, fact-disjoint split, perplexity texts) as evaluation/relearning.py builds them."""
    from sae_unlearn.evaluation.evaluate import relearn_config
    from sae_unlearn.evaluation.relearning import fact_disjoint_split, generic_texts

    rcfg = relearn_config(cfg.eval)
    generic = generic_texts()
    heldout = set(pack.forget_split("heldout"))
    control = generic[rcfg.ppl_texts :][-rcfg.generic_examples :] if rcfg.generic_examples else []
    split = fact_disjoint_split(
        pack.probes_in("target"), [t for t in pack.forget if t not in heldout], targets, control
    )
    return rcfg, split, generic[: rcfg.ppl_texts]


def _relearning_work(
    pack: ConceptPack, targets: Sequence[Probe], cfg: CompareConfig, n: _Lengths, base_reference: bool
) -> Work:
    """The fact-disjoint attacks (evaluation/relearning.py) on one model: every attack of the grid, each
    measured at its eval steps on the scored half and the generic perplexity texts. The base model's
    curves double as the methods' controls (computed once per compare, in the base evaluation), as does its
    unattacked measurement (`base_reference`: this stage computes it). A training step reads its batch
    padded to the longest text in it."""
    rcfg, split, ppl_texts = _attack_split(pack, targets, cfg)
    measure = _logprob_work(split.scored, n) + _ppl_work(ppl_texts, n)
    if not split.scored:
        return Work()
    work = Work(attack_forward_tokens=measure.forward_tokens) if base_reference else Work()
    for attack in rcfg.attacks:
        texts = split.texts(attack.text)
        if not texts:
            continue
        trained = attack.steps * padded_batch_tokens([n(t, attack.max_length) for t in texts], attack.batch_size)
        one = Work(
            attack_train_tokens=trained if attack.kind == "lora" else 0.0,
            full_attack_train_tokens=trained if attack.kind == "full" else 0.0,
            attack_forward_tokens=len(attack.eval_at) * measure.forward_tokens,  # its rate is timed with full logits
        )
        work += one * len(rcfg.seeds)
    return work


def training_plans(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], pack: ConceptPack, cfg: CompareConfig
) -> dict[str, TrainingPlan]:
    """The training stages of `compare(cfg)` (named as in `stage_plan`) and what each trains."""
    n = _Lengths(loaded.tokenizer)
    trunk = (max(s.layer for s in saes) + 1) / loaded.n_layers if saes else 1.0
    plans = {m: _training_plan(m, cfg.method_options.get(m, {}), loaded, pack, n, trunk) for m in cfg.methods}
    return {f"unlearn_{m}": plan for m, plan in plans.items() if plan is not None}


def stage_plan(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], pack: ConceptPack, cfg: CompareConfig
) -> list[tuple[str, Work]]:
    """The work of each stage `compare` runs, in order, under `cfg` (names as in results.json "seconds")."""
    n = _Lengths(loaded.tokenizer)
    trunk = (max(s.layer for s in saes) + 1) / loaded.n_layers if saes else 1.0
    plan: list[tuple[str, Work]] = []
    if any(METHODS[m].needs_saes for m in cfg.methods):
        forget, retain = pack.forget_split("train"), pack.retain_split("train")
        cached = stats_cache_path(loaded, saes, forget, retain, cfg.max_length).exists()  # then only read
        work = Work() if cached else _statistics_work(forget + retain, n, cfg.max_length, trunk)
        examples = forget[: cfg.examples_from] + retain[: cfg.examples_from]  # the report's top contexts
        plan.append(("feature_selection", work + _statistics_work(examples, n, cfg.max_length, trunk)))
    plan.append(("evaluate_base", _evaluation_work("base", "base", loaded, pack, cfg, n, trunk, False)))
    base_levels_pending = True
    ev = cfg.eval
    # the base model's attack curves are the methods' controls: computed by the base evaluation when it is
    # attacked, else by the first attacked method's
    control_pending = not ev.relearning_for("base")
    for method in cfg.methods:
        options = cfg.method_options.get(method, {})
        training = _training_plan(method, options, loaded, pack, n, trunk)
        plan.append((f"unlearn_{method}", training.work if training is not None else Work()))
        first = base_levels_pending and METHODS[method].needs_saes
        base_levels_pending = base_levels_pending and not first
        work = _evaluation_work(method, method, loaded, pack, cfg, n, trunk, first)
        if control_pending and ev.relearning_for(method):
            targets = [p for p in select_probes(pack, None, ev) if p.ring == "target"]
            control = _relearning_work(pack, targets, cfg, n, base_reference=True)
            work, control_pending = work + control, False
        plan.append((f"evaluate_{method}", work))
    return plan


def estimate(
    plan: Sequence[tuple[str, Work]], rates: Throughput, trainings: Mapping[str, TrainingPlan] | None = None
) -> list[StageEstimate]:
    """Seconds per stage: its work divided by the measured rates, or for a training stage whose steps were
    timed (`rates.step_seconds`), from that time per step."""
    trainings = trainings or {}

    def seconds(stage: str, work: Work) -> float:
        if stage in trainings and stage in rates.step_seconds:
            return trainings[stage].seconds(rates, rates.step_seconds[stage])
        return work.seconds(rates)

    return [StageEstimate(stage, seconds(stage, work), work) for stage, work in plan]


def estimate_compare(
    loaded: LoadedModel, pack: ConceptPack, cfg: CompareConfig, budget_s: float = 0.4
) -> tuple[list[StageEstimate], Throughput]:
    """Probe throughput on the run's model and SAEs, time a few steps of each training method and of the
    relearning attack on the run's own texts, then estimate every stage of `compare(cfg)`."""
    saes: list[LoadedSAE] = []
    if any(METHODS[m].needs_saes for m in cfg.methods):
        from sae_unlearn.saes import load_saes_for

        saes = load_saes_for(loaded, cfg.sae)
    attack = None
    if any(cfg.eval.relearning_for(name) for name in ("base", *cfg.methods)):
        targets = [p for p in select_probes(pack, None, cfg.eval) if p.ring == "target"]
        rcfg, split, _ = _attack_split(pack, targets, cfg)
        firsts = {a.kind: a for a in reversed(rcfg.attacks) if split.texts(a.text) and split.scored}
        timed = [(a, split.texts(a.text)) for a in firsts.values()]
        attack = AttackProbe(timed, rcfg.dtype, rcfg.autocast) if timed else None
    trainings = training_plans(loaded, saes, pack, cfg)
    rates = probe_throughput(loaded, saes, budget_s, attack, train_rates=False)  # every training stage is timed
    for stage in trainings:
        method = stage.removeprefix("unlearn_")
        options = cfg.method_options.get(method, {})
        rates.step_seconds[stage] = method_step_seconds(method, options, loaded, pack, saes, cfg.k)
    return estimate(stage_plan(loaded, saes, pack, cfg), rates, trainings), rates


def estimate_to_dict(stages: Sequence[StageEstimate], rates: Throughput) -> dict[str, Any]:
    """estimate.json's content (a rate that was not measured, because the run does not need it, is null)."""
    measured = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(rates).items()}
    return {
        "stages": {s.stage: round(s.seconds, 1) for s in stages},
        "total_seconds": round(sum(s.seconds for s in stages), 1),
        "throughput_per_second": measured,
        "work": {s.stage: {k: round(v) for k, v in asdict(s.work).items() if v} for s in stages},
    }


def measured_stage_seconds(results: Mapping[str, Any]) -> dict[str, float]:
    """Each stage's seconds in a `compare` / `demo` results.json, named as the estimate names its stages."""
    seconds = {stage: float(s) for stage, s in results["seconds"].items() if stage != "total"}
    return seconds | {f"evaluate_{name}": float(m["seconds"]) for name, m in results["methods"].items()}


def estimate_against_measured(estimated: Mapping[str, float], measured: Mapping[str, float]) -> dict[str, Any]:
    """Per stage and in all, the estimated and measured seconds and measured / estimated (1.25: 25% over
    the estimate); stages without work in the estimate (clamp's and ablate's "training") are left out."""

    def row(e: float, m: float) -> dict[str, float]:
        return {"estimated": round(e, 1), "measured": round(m, 1), "ratio": round(m / e, 3)}

    common = [stage for stage, e in estimated.items() if e > 0 and stage in measured]
    total_e, total_m = sum(estimated[s] for s in common), sum(measured[s] for s in common)
    return {
        "stages": {stage: row(estimated[stage], measured[stage]) for stage in common},
        "total": row(total_e, total_m) if common else None,
    }
