"""Who may do what, and with which keys: caller authentication, envelope encryption, the egress
guard, the destination rules, and the start-up secrets (master key ring, admin token)."""
