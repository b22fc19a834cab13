"""Offline evaluation against ACOUSLIC-AI-layout cases: the case and prediction folders, the challenge's
scoring of saved predictions, the pipeline run in evaluation mode, per-sweep figures and phantom cases."""
