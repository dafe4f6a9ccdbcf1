"""Build the generic English corpus the shipped SAEs are trained on, from text inside PyPI packages.

Sources (all offline):
- 206 shortened English Wikipedia articles from gensim's test data (CC BY-SA 3.0, Wikipedia
  contributors), wiki markup stripped with gensim's own `filter_wiki`;
- the Lee background news corpus from gensim's test data (300 Australian news articles);
- the Python language reference topics shipped with CPython (pydoc_data, PSF licence);
- text sampled from the embedded model itself, continuing the first sentence of paragraphs above.

Writes DIR/train.txt and DIR/heldout.txt (blank-line separated paragraphs; every 20th Wikipedia
article and every 20th news article is held out) and DIR/ATTRIBUTION.md.

    python scripts/build_generic_corpus.py --out data/generic --sample-tokens 400000
"""

from __future__ import annotations

import argparse
import bz2
import logging
import random
import re
from pathlib import Path

log = logging.getLogger("build_generic_corpus")
VOCAB_EXTRA = (1, 106)  # eos, end-of-turn


def gensim_data() -> Path:
    import gensim  # only needed for the real text, not for --sample-only

    return Path(gensim.__file__).parent / "test" / "test_data"


def wiki_articles() -> list[tuple[str, list[str]]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = next(gensim_data().glob("enwiki-latest-pages-articles1*shortened.bz2"))
    articles = []
    with bz2.open(path) as f:
        for title, text, _pageid in extract_pages(f):
            if not text or text.lower().startswith("#redirect") or ":" in title:
                continue
            clean = filter_wiki(text)
            paragraphs = []
            for block in re.split(r"\n\s*\n", clean):
                block = re.sub(r"'{2,}", "", block)
                block = re.sub(r"^=+.*?=+\s*$", "", block, flags=re.M)  # headings
                block = re.sub(r"^\s*[*#:;|!].*$", "", block, flags=re.M)  # lists, tables
                block = re.sub(r"\s+", " ", block).strip()
                if len(block.split()) >= 25 and not block.startswith(("Category", "thumb")):
                    paragraphs.append(block)
            if paragraphs:
                articles.append((title, paragraphs))
    return articles


def news_articles() -> list[str]:
    lines = (gensim_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return [re.sub(r"\s+", " ", line).strip() for line in lines if len(line.split()) >= 25]


def clean_sample(text: str) -> str:
    """Drop control tokens a full-vocabulary sampler can emit (e.g. <start_of_image>)."""
    text = re.sub(r"<(start|end)_of_\w+>|<unused\d+>|<pad>|<eos>|<bos>|<mask>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def python_reference() -> list[str]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics.values())
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if len(p.split()) >= 25 and not p.startswith((">>>", "..."))]


def sample_from_model(
    seeds: list[str],
    vocab_text: list[str],
    n_tokens: int,
    seed: int,
    batch: int = 192,
    new_tokens: int = 64,
    sink: Path | None = None,
    model: str = "embedded",
    device: str = "cpu",
) -> list[str]:
    """Continue seed sentences with the embedded model (top-k 40, temperature 0.9).

    Sampling is restricted to the tokens that occur in the real text: the lm_head then computes only
    those rows of its 262k, which makes CPU sampling fast enough, and the output stays plain English.
    """
    import torch

    from sae_unlearn.models.loading import load_model

    torch.manual_seed(seed)
    loaded = load_model(model, device=device)
    tok, model = loaded.tokenizer, loaded.model
    vocab_ids = sorted({t for s in vocab_text for t in tok(s, add_special_tokens=False).input_ids} | set(VOCAB_EXTRA))
    vocab = torch.tensor(vocab_ids, device=loaded.device)
    head = model.get_output_embeddings().weight[vocab].float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    body = model.get_decoder()
    out: list[str] = []
    made = 0
    rng = random.Random(seed)
    while made < n_tokens:
        prompts = [rng.choice(seeds) for _ in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
        mask, ids, cache = enc.attention_mask, enc.input_ids, None
        generated = []
        if loaded.device.type == "cuda":  # a GPU runs the plain HF sampler (full vocabulary) fast enough
            with torch.no_grad():
                full = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=40,
                    temperature=0.9,
                    max_new_tokens=new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            generated = [full[:, enc.input_ids.shape[1] :]]
        with torch.no_grad():
            for _ in range(0 if generated else new_tokens):
                res = body(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                logits = res.last_hidden_state[:, -1].float() @ head.T
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                top, order = (logits / 0.9).topk(40, dim=-1)  # top-k: a full sort per step costs more than the model
                choice = order.gather(-1, torch.multinomial(torch.softmax(top, -1), 1))
                ids = vocab[choice]
                generated.append(ids)
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
        for prompt, row in zip(prompts, torch.cat(generated, 1).tolist(), strict=True):
            text = re.sub(r"\s+", " ", prompt + " " + tok.decode(row, skip_special_tokens=True)).strip()
            made += len(row)
            if len(text.split()) >= 25:
                out.append(text)
        if sink is not None:  # keep what was sampled if the run is stopped
            sink.write_text("\n\n".join(out) + "\n", encoding="utf-8")
        log.info("sampled %d / %d tokens", made, n_tokens)
    return out


def sample_continuations(real: list[str], args: argparse.Namespace, sink: Path) -> None:
    """Continue the first 12 words of each real paragraph; the real text also gives the vocabulary."""
    seeds = [" ".join(p.split()[:12]) for p in real]
    sample_from_model(
        seeds, real, args.sample_tokens, args.seed, batch=args.batch, sink=sink, model=args.model, device=args.device
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/generic"))
    parser.add_argument("--sample-tokens", type=int, default=200_000, help="tokens of model-sampled text to add")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-samples", action="store_true", help="use DIR/sampled.txt from an earlier run")
    parser.add_argument(
        "--sample-only",
        type=Path,
        default=None,
        metavar="REAL_TRAIN_TXT",
        help="only sample (seeds and vocabulary from this real-text file), e.g. on a GPU machine "
        "without gensim; writes DIR/sampled.txt",
    )
    parser.add_argument("--model", default="embedded", help="model to sample from (a .gguf path works too)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=192)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    sampled_path = args.out / "sampled.txt"
    if args.sample_only is not None:
        real = [p for p in args.sample_only.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        sample_continuations(real, args, sampled_path)
        return
    train: list[str] = []
    heldout: list[str] = []
    for i, (_title, paragraphs) in enumerate(wiki_articles()):
        (heldout if i % 20 == 7 else train).extend(paragraphs)
    for i, article in enumerate(news_articles()):
        (heldout if i % 20 == 7 else train).append(article)
    for i, paragraph in enumerate(python_reference()):
        (heldout if i % 20 == 7 else train).append(paragraph)
    log.info("real text: %d train / %d held-out paragraphs", len(train), len(heldout))
    if args.sample_tokens > 0 and not args.reuse_samples:
        sample_continuations(train, args, sampled_path)
    if sampled_path.exists():
        sampled = (clean_sample(p) for p in sampled_path.read_text(encoding="utf-8").split("\n\n"))
        train.extend(p for p in sampled if len(p.split()) >= 25)
    random.Random(args.seed).shuffle(train)
    (args.out / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (args.out / "heldout.txt").write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
    (args.out / "ATTRIBUTION.md").write_text(
        "Wikipedia text: 206 shortened English Wikipedia articles shipped in gensim's test data, "
        "by Wikipedia contributors, CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/); "
        "markup stripped. News text: the Lee background corpus shipped in gensim's test data "
        "(Lee, Pincombe and Welsh, 2005). Python reference text: CPython's pydoc_data topics (PSF License). "
        "Sampled text: generated by Gemma 3 270M (Gemma terms of use).\n",
        encoding="utf-8",
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
