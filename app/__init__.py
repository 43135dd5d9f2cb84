"""Gradio UI: layout, event handlers, rendering of engine events. No model code (shared/DESIGN.md)."""
