# The plugins km.pkr.hcl needs on Packer >= 1.7, which no longer ships the amazon-ebs and
# googlecompute builders itself. Install them once with
#
#   packer init packer/plugins
#
# They land in Packer's plugin directory, where `packer build packer/` finds them. This
# file is kept apart from the template on purpose: Packer 1.6 (Debian 12's, which checks
# the template in the tests) rejects a `packer` block with `required_plugins`. The null
# builder, the file and shell provisioners and the manifest post-processor are built into
# every Packer.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1"
    }
    googlecompute = {
      source  = "github.com/hashicorp/googlecompute"
      version = "~> 1"
    }
  }
}
