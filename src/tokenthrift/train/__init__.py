"""Training engine: config, method protocol, epoch loop, checkpoints, DDP."""
from .config import TrainConfig, load_recipe, recipe_names
from .engine import Trainer, evaluate, load_trained, train
from .models import build_model, model_input_size
from .methods import METHODS, Method, TokenExpansion, build_method

__all__ = ["TrainConfig", "Trainer", "train", "build_model", "evaluate", "load_trained", "model_input_size",
           "load_recipe", "recipe_names", "Method", "TokenExpansion", "METHODS", "build_method"]
