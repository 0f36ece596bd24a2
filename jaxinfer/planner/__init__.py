"""Memory / roofline planner (`jaxinfer plan`): what a model needs on a device and how fast it can run there,
computed with the engine's own arithmetic (parameter declarations, KV budget) rather than rules of thumb."""
from jaxinfer.planner.hardware import GPUS, Accelerator, custom_accelerator, get_accelerator
from jaxinfer.planner.plan import PlanRequest, load_model_config, plan

__all__ = ["GPUS", "Accelerator", "PlanRequest", "custom_accelerator", "get_accelerator", "load_model_config",
           "plan"]
