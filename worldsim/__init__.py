"""Session engine: sessions and turns, modes, scheduler, jobs, persistence (shared/DESIGN.md)."""
