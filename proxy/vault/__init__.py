"""The vault: connections in, decrypted credentials out; nothing plaintext at rest."""
