"""A measured time estimate for `compare` / `demo`: a few seconds of throughput probing on the run's own
model, SAEs, device and compute dtype, multiplied by the work each stage will do under the run's settings.

The work model counts, per stage, what the code paths in features/, methods/ and evaluation/ run:
    forward tokens      the decoder body without the lm_head (no gradient)
    lm_head rows        positions whose logits are computed (Gemma 3's 262k-row lm_head dominates them)
    SAE tokens          tokens passed through every loaded SAE's encoder (statistics, hooks, re-activation)
    train tokens        forward + backward through the body with a hidden-state loss (CRISP, RMU)
    LM train tokens     LoRA forward + backward with NPO's next-token loss (chunked, checkpointed lm_head)
    attack tokens       the relearning attacks' training and forward tokens, on their float32 copies
    generated tokens    greedy decoding steps times the batch (fluency samples and checks)
Token counts come from tokenizing the pack's texts with the run's truncation lengths, so they follow
every setting (steps, batch sizes, max lengths, probe counts, attacks); nothing is a fixed constant.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from sae_unlearn.concepts.pack import ConceptPack, Probe
from sae_unlearn.evaluation.adversarial import adversarial_probes
from sae_unlearn.evaluation.evaluate import GENERIC_TEXT, select_probes
from sae_unlearn.evaluation.relearning import mixed_precision
from sae_unlearn.evaluation.scoring import letter_prompt, question_prompt
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
    attack_forward_tokens: float = math.inf
    dtype: str = ""
    device: str = ""
    probe_seconds: float = 0.0


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
    attack_forward_tokens: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, factor: float) -> Work:
        return Work(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def seconds(self, rates: Throughput) -> float:
        return sum(getattr(self, f.name) / getattr(rates, f.name) for f in fields(self) if getattr(self, f.name))


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


def _lora_copy(loaded: LoadedModel, dtype: torch.dtype | None = None) -> Any:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(loaded.model)
    if dtype is not None:
        model = model.to(dtype)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(n for n in names if n.endswith(("proj", "c_attn", "c_proj", "c_fc")) and n != "lm_head")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)).train()


def probe_throughput(
    loaded: LoadedModel,
    saes: Sequence[LoadedSAE],
    budget_s: float = 0.4,
    attack_dtype: str | None = None,
    attack_autocast: torch.dtype | None = None,
) -> Throughput:
    """Measure each rate on the run's own model and SAEs (a few seconds in all; the model is not changed).
    `attack_dtype`: the relearning attacks' copy dtype, when they run (their steps are timed on such a copy,
    under `attack_autocast` as the attacks run)."""
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
    lora = _lora_copy(loaded)
    lora_body = decoder_body(lora)
    batch = Batch(ids, mask, torch.ones_like(ids, dtype=torch.bool))

    def train_step() -> None:
        out = lora_body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()

    def lm_train_step() -> None:  # NPO's loss path: the lm_head in chunks under activation checkpointing
        logp, _ = token_logprobs(lora, batch)
        (-logp.mean()).backward()

    train_rate = _rate(train_step, tokens, budget_s)
    lm_train_rate = _rate(lm_train_step, tokens, budget_s)
    attack_train_rate = attack_forward_rate = lm_train_rate
    if attack_dtype is not None:
        attack = _lora_copy(loaded, getattr(torch, attack_dtype))

        def attack_step() -> None:
            logits = attack(input_ids=ids, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

        with mixed_precision(device.type, attack_autocast):
            attack_train_rate = _rate(attack_step, tokens, budget_s)
            with torch.no_grad():
                attack_forward_rate = _rate(lambda: attack(input_ids=ids, attention_mask=mask).logits, tokens, budget_s)
        del attack
    return Throughput(
        forward_tokens=forward_rate,
        lm_head_rows=lm_head_rate,
        sae_tokens=sae_rate,
        train_tokens=train_rate,
        lm_train_tokens=lm_train_rate,
        generated_tokens=generation_rate,
        attack_train_tokens=attack_train_rate,
        attack_forward_tokens=attack_forward_rate,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(device),
        probe_seconds=round(time.perf_counter() - started, 1),
    )


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


def _method_work(
    method: str, options: dict[str, Any], loaded: LoadedModel, pack: ConceptPack, n: _Lengths, trunk: float
) -> Work:
    training = METHODS[method].training_work(method_config(method, options), loaded, pack)
    if training is None:
        return Work()  # an intervention only writes its artifact
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
        frozen = Work(forward_tokens=steps * retain_batch * training.depth)
    elif training.frozen_states == "forget_logprobs_first_epoch":
        frozen = Work(forward_tokens=forget_batch, lm_head_rows=forget_batch) * first_epoch
    else:  # FrozenReference
        frozen = Work(forward_tokens=(forget_batch + retain_batch) * trunk + coherence) * first_epoch
    work = step * steps + frozen
    if training.fluency_every:
        checks = steps // training.fluency_every + 1  # one for the base model's own continuations
        prompts = pack.prompt_split("tune")
        check = _generation_work(prompts, FLUENCY_CHECK_TOKENS) + _fluency_work(prompts, FLUENCY_CHECK_TOKENS, n)
        work = work + check * checks
    return work


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
        work += _relearning_work(pack, targets, cfg, n)
    return work


def _relearning_work(pack: ConceptPack, targets: Sequence[Probe], cfg: CompareConfig, n: _Lengths) -> Work:
    """The fact-disjoint attacks (evaluation/relearning.py) on one model: every attack of the grid, each
    measured at its eval steps on the scored half and the generic perplexity texts. The base model's
    curves double as the methods' controls (computed once per compare, in the base evaluation)."""
    from sae_unlearn.evaluation.evaluate import relearn_config
    from sae_unlearn.evaluation.relearning import fact_disjoint_split, generic_texts

    rcfg = relearn_config(cfg.eval)
    generic = generic_texts()
    ppl_texts = generic[: rcfg.ppl_texts]
    heldout = set(pack.forget_split("heldout"))
    control = generic[rcfg.ppl_texts :][-rcfg.generic_examples :] if rcfg.generic_examples else []
    split = fact_disjoint_split(
        pack.probes_in("target"), [t for t in pack.forget if t not in heldout], targets, control
    )
    measure = _logprob_work(split.scored, n) + _ppl_work(ppl_texts, n)
    work = Work()
    for attack in rcfg.attacks:
        texts = split.texts(attack.text)
        if not texts or not split.scored:
            continue
        steps = max(attack.eval_at)
        per_step = min(attack.batch_size, len(texts)) * n.mean(texts, attack.max_length)
        points = len(attack.eval_at)
        one = Work(
            attack_train_tokens=steps * per_step,
            attack_forward_tokens=points * measure.forward_tokens,  # its rate is timed with full logits
        )
        work += one * len(rcfg.seeds)
    return work


def stage_plan(
    loaded: LoadedModel, saes: Sequence[LoadedSAE], pack: ConceptPack, cfg: CompareConfig
) -> list[tuple[str, Work]]:
    """The work of each stage `compare` runs, in order, under `cfg` (names as in results.json "seconds")."""
    n = _Lengths(loaded.tokenizer)
    trunk = (max(s.layer for s in saes) + 1) / loaded.n_layers if saes else 1.0
    plan: list[tuple[str, Work]] = []
    if any(METHODS[m].needs_saes for m in cfg.methods):
        forget, retain = pack.forget_split("train"), pack.retain_split("train")
        work = _statistics_work(forget + retain, n, cfg.max_length, trunk)
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
        plan.append((f"unlearn_{method}", _method_work(method, options, loaded, pack, n, trunk)))
        first = base_levels_pending and METHODS[method].needs_saes
        base_levels_pending = base_levels_pending and not first
        work = _evaluation_work(method, method, loaded, pack, cfg, n, trunk, first)
        if control_pending and ev.relearning_for(method):
            targets = [p for p in select_probes(pack, None, ev) if p.ring == "target"]
            work, control_pending = work + _relearning_work(pack, targets, cfg, n), False
        plan.append((f"evaluate_{method}", work))
    return plan


def estimate(plan: Sequence[tuple[str, Work]], rates: Throughput) -> list[StageEstimate]:
    """Seconds per stage: each stage's work divided by the measured rates."""
    return [StageEstimate(stage, work.seconds(rates), work) for stage, work in plan]


def estimate_compare(
    loaded: LoadedModel, pack: ConceptPack, cfg: CompareConfig, budget_s: float = 0.4
) -> tuple[list[StageEstimate], Throughput]:
    """Probe throughput on the run's model and SAEs, then estimate every stage of `compare(cfg)`."""
    saes: list[LoadedSAE] = []
    if any(METHODS[m].needs_saes for m in cfg.methods):
        from sae_unlearn.saes import load_saes_for

        saes = load_saes_for(loaded, cfg.sae)
    from sae_unlearn.evaluation.evaluate import relearn_config
    from sae_unlearn.evaluation.relearning import autocast_dtype

    attacks = any(cfg.eval.relearning_for(name) for name in ("base", *cfg.methods))
    rcfg = relearn_config(cfg.eval)
    rates = probe_throughput(
        loaded, saes, budget_s, rcfg.dtype if attacks else None, autocast_dtype(loaded, rcfg.autocast)
    )
    return estimate(stage_plan(loaded, saes, pack, cfg), rates), rates


def estimate_to_dict(stages: Sequence[StageEstimate], rates: Throughput) -> dict[str, Any]:
    return {
        "stages": {s.stage: round(s.seconds, 1) for s in stages},
        "total_seconds": round(sum(s.seconds for s in stages), 1),
        "throughput_per_second": asdict(rates),
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
