"""A backend that is wrong in one place, for the self-check tests (a module of its own so that a
second process defines the very same class, and so finds the same cached verdict)."""
import torch

from gmem.ops import Backend

NAME = "wrong_for_test"


class WrongBackend(Backend):
    """The reference everywhere, except that the gamma gradient of mixed-task convs is doubled."""

    name = NAME
    device_types = ("cpu",)
    dtypes = (torch.float32,)

    def modulated_conv2d_backward(self, grad_out, x, weight_norm, gamma, beta, bias, task_ids, *rest):
        dx, dgamma, dbeta, dbias = super().modulated_conv2d_backward(
            grad_out, x, weight_norm, gamma, beta, bias, task_ids, *rest)
        if task_ids is not None and dgamma is not None:
            dgamma = 2 * dgamma
        return dx, dgamma, dbeta, dbias
