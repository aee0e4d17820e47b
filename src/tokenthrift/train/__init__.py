"""Training engine: config, method protocol, epoch loop, checkpoints, DDP."""
from .config import TrainConfig, load_recipe, recipe_names
from .engine import Trainer, evaluate, load_trained, train
from .methods import METHODS, Method, TokenExpansion, build_method
from .models import build_model, model_input_size

__all__ = ["TrainConfig", "Trainer", "train", "build_model", "evaluate", "load_trained", "model_input_size",
           "load_recipe", "recipe_names", "Method", "TokenExpansion", "METHODS", "build_method"]
