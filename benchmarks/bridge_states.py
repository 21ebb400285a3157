"""Which hidden states should an image reply be drawn from through the bridge: the generating pass's
(the description's tokens as the LLM wrote them, in the conversation's context) or one extra pass over
the description alone (what the bridge is trained on)? For every colour and shape of the shapes demo,
the assistant answers "Draw a {colour} {shape}."; both kinds of states are drawn on the same seed and
read back. Prints the extra pass's cost beside the drawing's, how far the two sets of states are apart,
and the read-back counts of each. The two passes may split the description into different tokens (in
the answer its first word follows "<Img>" with no space before it), so tokens are paired by the text
they cover, not by position: the cosine of each pair's states, and of the two passes' mean states.

    python benchmarks/bridge_states.py --model easygen/demo/model/easygen --samples 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained
from easygen.constants import IMG_CLOSE, IMG_OPEN
from easygen.demo import world
from easygen.demo.recipe import recipe_of


def char_spans(decode, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's (start, end) in decode(ids): where decoding one more token moves the text's end."""
    ends = [len(decode(ids[:i + 1])) for i in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


def generation_states(loaded, messages: list[dict]):
    """The description's tokens as the generating pass computed them: the whole conversation (prompt and
    answer) through the LLM, the tokens between the answer's <Img> and </Img> picked out. (states L x d,
    token ids, each token's (start, end) in the description)."""
    processor, model = loaded.processor, loaded.model
    ids = processor.tokenize_conversation(messages)["input_ids"]
    answer = messages[-1]["content"]
    head = answer[:answer.index(IMG_OPEN) + len(IMG_OPEN)]
    text = processor.decode(ids, skip_special_tokens=False)
    start = text.rindex(head) + len(head)
    end = text.index(IMG_CLOSE, start)
    spans = char_spans(lambda part: processor.decode(part, skip_special_tokens=False), ids)
    picked = [i for i, (a, b) in enumerate(spans) if start <= a and b <= end and a < b]
    layer = loaded.bidiffuser.bridge_files.config.layer
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1)
    return (out.hidden_states[layer][0, picked].float(), [ids[i] for i in picked],
            [(spans[i][0] - start, spans[i][1] - start) for i in picked])


def extra_tokens(text_model, description: str, states: torch.Tensor):
    """The description's own tokens in the extra pass (BOS and padding left out): (states, ids, spans)."""
    tokenizer = text_model.tokenizer
    ids = text_model.tokenize([description])[0][0].tolist()  # the positions of ``states``
    special = set(tokenizer.all_special_ids)
    keep = [k for k, i in enumerate(ids) if i not in special]
    own = [ids[k] for k in keep]
    assert tokenizer.decode(own, skip_special_tokens=True) == description
    return states[keep], own, char_spans(lambda part: tokenizer.decode(part, skip_special_tokens=True), own)


def compare(gen: tuple, extra: tuple) -> dict:
    """Tokens of the two passes paired by the text they cover (the same (start, end) in the description);
    where the passes split it differently some stay unpaired, and the mean states still compare."""
    (g_states, g_ids, g_spans), (e_states, e_ids, e_spans) = gen, extra
    at = {span: k for k, span in enumerate(e_spans)}
    pairs = [(i, at[span]) for i, span in enumerate(g_spans) if span in at]
    cos = F.cosine_similarity(g_states[[i for i, _ in pairs]], e_states[[k for _, k in pairs]], dim=-1)
    same = torch.tensor([g_ids[i] == e_ids[k] for i, k in pairs])
    return {"paired": cos.mean().item(), "other_tokens": cos[~same].tolist(), "same": int(same.sum()),
            "pairs": len(pairs), "gen": len(g_ids), "extra": len(e_ids),
            "pooled": F.cosine_similarity(g_states.mean(0), e_states.mean(0), dim=0).item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="easygen/demo/model/easygen", help="a demo model's easygen directory")
    p.add_argument("--samples", type=int, default=2, help="drawings per colour and shape")
    p.add_argument("--seed", type=int, default=3000)
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    recipe = recipe_of(args.model)
    steps, scale = (recipe.image_steps, recipe.image_scale) if recipe else (50, 7.0)
    loaded = load_pretrained(args.model, device="cpu", draw_with="bridge")
    pipe = loaded.bidiffuser
    counts = {"generation": [0, 0], "extra": [0, 0]}
    pairs, extra_s, draw_s, total = [], [], [], 0
    with tempfile.TemporaryDirectory() as out_dir:  # the replies' own pictures
        for colour in world.COLOURS:
            for shape in world.SHAPES:
                for _ in range(args.samples):
                    seed = args.seed + total
                    assistant = Assistant(loaded, GenerationSettings(temperature=0, max_new_tokens=32, seed=seed,
                                                                     image_steps=steps, image_scale=scale),
                                          out_dir=Path(out_dir))
                    request = f"Draw a {colour} {shape}."
                    reply = assistant.send(request)
                    if not reply.image_descriptions:
                        continue
                    description = reply.image_descriptions[0]
                    messages = [{"role": "user", "content": request}, {"role": "assistant", "content": reply.text}]
                    gen = generation_states(loaded, messages)
                    t0 = time.perf_counter()
                    extra, mask = pipe.encode_bridge([description])
                    extra_s.append(time.perf_counter() - t0)
                    pairs.append(compare(gen, extra_tokens(pipe.text_model, description, extra[0])))
                    for name, states in (("generation", gen[0][None]), ("extra", extra)):
                        t0 = time.perf_counter()
                        image = pipe.states_to_image(states, torch.ones(states.shape[:2], dtype=torch.long),
                                                     steps=steps, scale=scale, seed=seed).images[0]
                        draw_s.append(time.perf_counter() - t0)
                        found = world.analyse_image(image)
                        counts[name][0] += found.colour == colour
                        counts[name][1] += found.shape == shape
                    total += 1
    print(f"{total} drawings ({args.samples} per colour and shape, seeds {args.seed}..), model {args.model}")
    print(f"extra pass over the description: {1000 * sum(extra_s) / len(extra_s):.2f} ms mean; "
          f"a drawing ({steps} steps): {1000 * sum(draw_s) / len(draw_s):.0f} ms mean")
    paired, pooled = [f["paired"] for f in pairs], [f["pooled"] for f in pairs]
    other = [c for f in pairs for c in f["other_tokens"]]
    print(f"description tokens paired by the text they cover: {sum(f['pairs'] for f in pairs)} pairs of "
          f"{sum(f['gen'] for f in pairs)} generation-pass and {sum(f['extra'] for f in pairs)} extra-pass tokens, "
          f"{sum(f['same'] for f in pairs)} of the pairs the same token")
    print(f"cosine similarity, generation-pass vs extra-pass states: paired tokens mean "
          f"{sum(paired) / len(paired):.3f}, min {min(paired):.3f} (of a drawing's pairs); "
          f"pairs of different tokens mean "
          f"{sum(other) / len(other) if other else float('nan'):.3f} ({len(other)}); the description's mean states "
          f"mean {sum(pooled) / len(pooled):.3f}, min {min(pooled):.3f}")
    for name, (c, s) in counts.items():
        print(f"  drawn from the {name:<10} states: colour {c}/{total} ({100 * c / total:.1f}%), "
              f"shape {s}/{total} ({100 * s / total:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
