"""What a reader sees of an answer's picture tags: never a raw <Img> or </Img>."""
from easygen.image_reply import ImageTagStream, has_stray_tags, replace_image_tags

RENDER = lambda description, k: f"[picture {k}: {description}]"  # noqa: E731


def stream(pieces, final=None):
    s = ImageTagStream()
    shown = "".join(s.feed(p) for p in pieces)
    return shown, shown + s.finish(RENDER, text=final)


def test_tags_are_held_back_and_rendered_at_the_end():
    shown, whole = stream([" Sure", ", here", " it is: <", "Img>a red", " circle</", "Img> done."])
    assert shown == " Sure, here it is: " and whole == " Sure, here it is: [picture 0: a red circle] done."


def test_a_stripped_final_answer_does_not_repeat_the_streamed_text():
    shown, whole = stream([" Here", " it is: <Img>a star</Img>"], final="Here it is: <Img>a star</Img>")
    assert whole == " Here it is: [picture 0: a star]"


def test_stray_and_unfinished_tags_lose_their_marks_and_are_reported():
    text = "Look: <Img>a blue squa"
    assert has_stray_tags(text) and not has_stray_tags("a <Img>b</Img> c") and not has_stray_tags("plain")
    assert replace_image_tags(text, RENDER) == "Look: a blue squa"
    shown, whole = stream(["Look: <Im", "g>a blue squa"])
    assert shown == "Look: " and whole == "Look: a blue squa" and "<" not in whole
