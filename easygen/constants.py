"""Names shared by the prompt builder, the tokenizer side and the model."""

# The image marks are the conversation template's: <ImageHere> (an image's features), the
# <Img><ImageHere></Img> slot of a user turn, and <Img>a red circle</Img> in an answer that draws.
from fastchat_ext.conversation import IMAGE_PLACEHOLDER, IMAGE_SLOT, IMG_CLOSE, IMG_OPEN  # noqa: F401
IMAGE_TOKEN_ID = -200                           # sentinel input id: one per image feature position
IGNORE_INDEX = -100                             # label value the loss ignores
NUM_IMAGE_TOKENS = 77                           # BiDiffuser text-latent length = image positions per image
