"""Which hidden states should an image reply be drawn from through the bridge: the generating pass's
(the description's tokens as the LLM wrote them, in the conversation's context) or one extra pass over
the description alone (what the bridge is trained on)? For every colour and shape of the shapes demo,
the assistant answers "Draw a {colour} {shape}."; both kinds of states are drawn on the same seed and
read back. Prints the extra pass's cost beside the drawing's, how far the two sets of states are apart
(cosine per token), and the read-back counts of each.

    python benchmarks/bridge_states.py --model easygen/demo/model/easygen --samples 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from easygen.assistant import Assistant, GenerationSettings
from easygen.builder import load_pretrained
from easygen.constants import IMG_CLOSE, IMG_OPEN
from easygen.demo import world
from easygen.demo.recipe import recipe_of


def generation_states(loaded, messages: list[dict], description: str) -> torch.Tensor:
    """The description's hidden states as the generating pass computed them: the whole conversation
    (prompt and answer) through the LLM, the description's tokens picked out (1 x L x d)."""
    processor, model = loaded.processor, loaded.model
    ids = processor.tokenize_conversation(messages)["input_ids"]
    answer = messages[-1]["content"]
    head = answer[:answer.index(IMG_OPEN) + len(IMG_OPEN)]
    # the description's tokens: between the answer's <Img> and </Img> (found by decoding growing prefixes)
    text = processor.decode(ids, skip_special_tokens=False)
    start_char = text.rindex(head) + len(head)
    end_char = text.index(IMG_CLOSE, start_char)
    spans, pos = [], 0
    for i in range(len(ids)):
        pos = len(processor.decode(ids[:i + 1], skip_special_tokens=False))
        spans.append(pos)
    first = next(i for i, end in enumerate(spans) if end > start_char)
    last = next(i for i, end in enumerate(spans) if end >= end_char)
    layer = loaded.bidiffuser.bridge_files.config.layer
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[layer][:, first:last + (spans[last] == end_char)].float()


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
    cosines, extra_s, draw_s, total = [], [], [], 0
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for _ in range(args.samples):
                seed = args.seed + total
                assistant = Assistant(loaded, GenerationSettings(temperature=0, max_new_tokens=32, seed=seed,
                                                                 image_steps=steps, image_scale=scale),
                                      out_dir=Path("/tmp/bridge_states"))
                request = f"Draw a {colour} {shape}."
                reply = assistant.send(request)
                if not reply.image_descriptions:
                    continue
                description = reply.image_descriptions[0]
                messages = [{"role": "user", "content": request}, {"role": "assistant", "content": reply.text}]
                gen = generation_states(loaded, messages, description)
                t0 = time.perf_counter()
                extra, mask = pipe.encode_bridge([description])
                extra_s.append(time.perf_counter() - t0)
                # the extra pass starts with BOS; compare the description's own tokens
                own = extra[:, -gen.shape[1]:]
                cosines.append(F.cosine_similarity(own, gen, dim=-1).mean().item())
                for name, states in (("generation", gen), ("extra", extra)):
                    t0 = time.perf_counter()
                    image = pipe.states_to_image(states, torch.ones(states.shape[:2], dtype=torch.long), steps=steps,
                                                 scale=scale, seed=seed).images[0]
                    draw_s.append(time.perf_counter() - t0)
                    found = world.analyse_image(image)
                    counts[name][0] += found.colour == colour
                    counts[name][1] += found.shape == shape
                total += 1
    print(f"{total} drawings ({args.samples} per colour and shape, seeds {args.seed}..), model {args.model}")
    print(f"extra pass over the description: {1000 * sum(extra_s) / len(extra_s):.2f} ms mean; "
          f"a drawing ({steps} steps): {1000 * sum(draw_s) / len(draw_s):.0f} ms mean")
    print(f"cosine similarity, generation-pass vs extra-pass states of the description's tokens: mean "
          f"{sum(cosines) / len(cosines):.3f}, min {min(cosines):.3f}")
    for name, (c, s) in counts.items():
        print(f"  drawn from the {name:<10} states: colour {c}/{total} ({100 * c / total:.1f}%), "
              f"shape {s}/{total} ({100 * s / total:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
