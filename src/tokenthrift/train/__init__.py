"""Training engine: config, the method protocol and its adapters, epoch loop, checkpoints, DDP."""
from .build import build_model, data_shape, model_input_size, resolve_preprocess, run_preprocess
from .config import TrainConfig, load_recipe, recipe_names
from .engine import Trainer, load_trained, train, unwrap
from .methods import METHODS, TokenExpansion, build_method, method_class
from .protocol import Method
from .tasks import TASKS, evaluate

__all__ = ["TrainConfig", "Trainer", "train", "build_model", "evaluate", "load_trained", "model_input_size",
           "load_recipe", "recipe_names", "Method", "TokenExpansion", "METHODS", "build_method", "method_class",
           "unwrap", "data_shape", "TASKS", "resolve_preprocess", "run_preprocess"]
