"""lmms-eval's registration of the ``easygen`` model (the ``lmms_eval.models`` entry point in
pyproject.toml). lmms-eval calls ``manifest`` when it builds its model registry; the model module,
torch and the weights load only when ``--model easygen`` is used."""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="easygen", simple_class_path="easygen.eval.lmms_model.EasyGen")
