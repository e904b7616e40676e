"""MLflow's models-from-code entry point for a logged pocketgpt model; not meant to be imported.

A copy of this file is stored with every logged model. ``mlflow.pyfunc.load_model`` runs it to
build the pyfunc object instead of unpickling one; the weights then load from safetensors in
``PocketGPTModel.load_context``.
"""

from mlflow.models import set_model

from pocketgpt.tracking.pyfunc import PocketGPTModel

set_model(PocketGPTModel())
