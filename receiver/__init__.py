"""caretaker receiver: Alertmanager webhook receiver that repairs services."""
