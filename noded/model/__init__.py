"""The pure, change-tracked model of services and endpoints."""
