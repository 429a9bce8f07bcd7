"""DCAL's branch names, in the order every loss, record and plot uses them (torch-free, so that tools which
only read logs can name the branches without importing torch)."""

__all__ = ["BRANCHES"]

BRANCHES = ("sa", "glca", "pwca")  # the branch losses, in the order UncertaintyLoss weighs them
