"""Everything that runs outside the gateway process, and the frame protocol on the pipes to it."""
