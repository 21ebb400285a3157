"""Names shared by the prompt builder, the tokenizer side and the model, and where EasyGen caches."""

# The image marks are the conversation template's: <ImageHere> (an image's features), the
# <Img><ImageHere></Img> slot of a user turn, and <Img>a red circle</Img> in an answer that draws.
from fastchat_ext.conversation import IMAGE_PLACEHOLDER, IMAGE_SLOT, IMG_CLOSE, IMG_OPEN  # noqa: F401
IMAGE_TOKEN_ID = -200                           # sentinel input id: one per image feature position
IGNORE_INDEX = -100                             # label value the loss ignores
NUM_IMAGE_TOKENS = 77                           # BiDiffuser text-latent length = image positions per image


def user_cache_dir():
    """EasyGen's folder in the user's cache: $XDG_CACHE_HOME/easygen, else ~/.cache/easygen."""
    import os
    from pathlib import Path
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "easygen"
