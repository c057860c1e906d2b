# Plugin requirements for Packer >= 1.7 (`packer init packer/`). Kept alone in
# this file because Debian's packer 1.6.6, which CI validates the template
# with, rejects the block; that version has the amazon builder built in.
packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}
