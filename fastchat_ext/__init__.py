"""What plugs EasyGen into FastChat: the conversation template, terminal chat IO, model adapter."""
