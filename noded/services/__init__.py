"""Service VIP backends and the sync runner that drives them."""
