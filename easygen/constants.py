"""Names shared by the prompt builder, the tokenizer side and the model, and where EasyGen caches."""

IMAGE_PLACEHOLDER = "<ImageHere>"               # where an image's features go in a prompt
IMAGE_SLOT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"  # how a user turn holds an image (as EasyGen writes it)
IMG_OPEN, IMG_CLOSE = "<Img>", "</Img>"         # an assistant answer asks for a picture: <Img>a red circle</Img>
IMAGE_TOKEN_ID = -200                           # sentinel input id: one per image feature position
IGNORE_INDEX = -100                             # label value the loss ignores
NUM_IMAGE_TOKENS = 77                           # BiDiffuser text-latent length = image positions per image


def user_cache_dir():
    """EasyGen's folder in the user's cache: $XDG_CACHE_HOME/easygen, else ~/.cache/easygen."""
    import os
    from pathlib import Path
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "easygen"
