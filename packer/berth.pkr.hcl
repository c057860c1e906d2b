# The berth pool host AMI: Debian 12 with the Docker engine (its own units
# masked: berth-agent starts dockerd itself), the berth-agent binary, its
# systemd unit and /etc/berth/agent.toml.
#
# Build the agent for the image first, on Debian 12 (the AMI's glibc) or for a
# musl target, then:
#   cargo build --release --bin berth-agent
#   packer init packer/     # current Packer versions only: reads plugins.pkr.hcl
#   packer build -var agent_binary=target/release/berth-agent -var subnet_id=subnet-... packer/
#
# CI validates this file on its own (`packer validate` of this file, which
# leaves out plugins.pkr.hcl: Debian's packer 1.6.6 rejects required_plugins).
# That is why everything except the plugin requirement lives in this one file.

variable "region" {
  type        = string
  description = "AWS region the AMI is built in (copy it to other regions afterwards)."
  default     = "eu-west-1"
}

variable "instance_type" {
  type        = string
  description = "Instance type of the temporary build instance; the pool's type is set in the launch template."
  default     = "t3.small"
}

variable "subnet_id" {
  type        = string
  description = "Subnet of the build instance; empty uses the default VPC. It needs a route to Debian's mirrors."
  default     = ""
}

variable "source_ami_owner" {
  type        = string
  description = "Owner of the source AMI: the Debian cloud team's account."
  default     = "136693071363"
}

variable "source_ami_name" {
  type        = string
  description = "Name filter of the source AMI; the newest match is used."
  default     = "debian-12-amd64-*"
}

variable "ami_name_prefix" {
  type        = string
  description = "The AMI is named PREFIX-YYYYMMDDhhmmss."
  default     = "berth-agent"
}

variable "root_volume_size" {
  type        = number
  description = "Root volume of the AMI in GiB; the launch template may enlarge it for image and build cache space."
  default     = 16
}

variable "agent_binary" {
  type        = string
  description = "Path of the berth-agent binary built for the image (x86_64 Linux, glibc <= Debian 12's or static)."
  # No default: baking an AMI with a stale or wrong binary must not happen by
  # accident.
}

variable "tags" {
  type        = map(string)
  description = "Extra tags on the AMI, its snapshot and the build instance."
  default     = {}
}

locals {
  # AMI names must be unique per region; a timestamp also orders them.
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
  tags = merge(
    {
      "Name"            = "${var.ami_name_prefix}-${local.timestamp}"
      "berth:component" = "agent-ami"
      "berth:source"    = "{{ .SourceAMIName }}"
    },
    var.tags,
  )
  # Where the file provisioners put berth's files on the build instance;
  # provision.sh reads them from there (BERTH_SRC).
  staging = "/tmp/berth-bake"
}

source "amazon-ebs" "debian12" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  # The Debian cloud images' login user.
  ssh_username = "admin"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }

  ami_name        = "${var.ami_name_prefix}-${local.timestamp}"
  ami_description = "berth pool host: Debian 12, Docker engine, berth-agent"
  ena_support     = true
  sriov_support   = true

  # iops and throughput are gp3's free baseline, stated because packer 1.6.6
  # rejects gp3 without a throughput.
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.root_volume_size
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  tags          = local.tags
  snapshot_tags = local.tags
  run_tags      = local.tags
}

build {
  sources = ["source.amazon-ebs.debian12"]

  # The file provisioner uploads a directory's contents only into an existing
  # directory.
  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}/systemd ${local.staging}/files"]
  }

  provisioner "file" {
    source      = var.agent_binary
    destination = "${local.staging}/berth-agent"
  }

  # Only the agent's unit is installed on pool hosts; the trailing slash
  # uploads the directory's contents.
  provisioner "file" {
    source      = "${path.root}/../systemd/berth-agent.service"
    destination = "${local.staging}/systemd/berth-agent.service"
  }

  provisioner "file" {
    source      = "${path.root}/files/"
    destination = "${local.staging}/files"
  }

  provisioner "shell" {
    script = "${path.root}/scripts/provision.sh"
    # As root, with the environment below; the script needs bash.
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    environment_vars = [
      "BERTH_SRC=${local.staging}",
      "BERTH_ROOT=/",
      "BERTH_REMOVE_SRC=1",
    ]
  }
}
