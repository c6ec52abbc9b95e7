# One KM appliance on EC2: the Packer-built image, a security group admitting HTTP and
# HTTPS from anywhere and SSH only from var.ssh_cidrs, an Elastic IP that is the
# machine's address from its first boot on, and a user-data script (run by cloud-init at
# first boot) that applies the settings headless when a licence is given.

data "aws_subnet" "this" {
  id = var.subnet_id
}

data "aws_ami" "km" {
  count = var.ami_id == null ? 1 : 0

  most_recent = true
  owners      = var.ami_owners

  filter {
    name   = "name"
    values = [var.ami_name_pattern]
  }

  filter {
    name   = "state"
    values = ["available"]
  }
}

locals {
  ami_id = var.ami_id != null ? var.ami_id : data.aws_ami.km[0].id

  tags = merge(var.tags, { Name = var.name })

  # The whole internet, as one security group rule takes it: one address family each.
  world = {
    ipv4 = { ipv4 = "0.0.0.0/0", ipv6 = null }
    ipv6 = { ipv4 = null, ipv6 = "::/0" }
  }

  # The appliance's settings file: names as km-wizard reads them. Unset (null or empty)
  # values are left out by the template; the WIZARD_* ones create the first admin and are
  # not written to /etc/km/km.env.
  settings = merge(var.extra_settings, {
    KM_DEDICATED_KEY      = var.licence
    KM_SITE_URL           = var.site_url
    KM_MONGO_URL          = var.mongo_url
    KM_ELASTICSEARCH_URL  = var.elasticsearch_url
    KM_REDIS_URL          = var.redis_url
    SMTP_HOST             = var.smtp_host
    SMTP_PORT             = var.smtp_port == null ? null : tostring(var.smtp_port)
    SMTP_USER             = var.smtp_user
    SMTP_PASSWORD         = var.smtp_password
    SMTP_SENDER           = var.smtp_sender
    SMTP_TLS              = var.smtp_tls
    KM_TLS                = var.km_tls
    KM_ACME_EMAIL         = var.acme_email
    KM_RETENTION_DAYS     = var.retention_days == null ? null : tostring(var.retention_days)
    WIZARD_ADMIN_USERNAME = var.admin_username
    WIZARD_ADMIN_EMAIL    = var.admin_email
    WIZARD_ADMIN_PASSWORD = var.admin_password
  })

  headless = var.licence != null && var.licence != ""

  # The first-boot script, as user data: cloud-init runs it once per instance. EC2 user
  # data is not secret: anyone allowed ec2:DescribeInstanceAttribute in the account, and
  # any process on the instance (through the metadata service), can read it, secrets
  # included. It also stays in the Terraform state. The README says how to rotate what
  # it carries after the first boot.
  user_data = templatefile("${path.module}/../shared/first-boot.sh.tftpl", {
    headless = local.headless
    settings = local.settings
  })
}

resource "aws_security_group" "km" {
  name_prefix = "${var.name}-"
  description = "KM appliance ${var.name}: HTTP and HTTPS from anywhere, SSH only from the listed ranges"
  vpc_id      = data.aws_subnet.this.vpc_id
  tags        = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

# HTTP and HTTPS from the whole internet, one rule per address family.
resource "aws_vpc_security_group_ingress_rule" "http" {
  # checkov:skip=CKV_AWS_260:The appliance is a public web service: port 80 answers the ACME HTTP-01 challenges and redirects browsers and agents to HTTPS
  for_each = local.world

  security_group_id = aws_security_group.km.id
  description       = "HTTP from anywhere (${each.key}): ACME HTTP-01 challenges, redirect to HTTPS"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = each.value.ipv4
  cidr_ipv6         = each.value.ipv6
  tags              = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "https" {
  for_each = local.world

  security_group_id = aws_security_group.km.id
  description       = "HTTPS from anywhere (${each.key}): dashboard, API and PM2 agents"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value.ipv4
  cidr_ipv6         = each.value.ipv6
  tags              = local.tags
}

# SSH only from the listed ranges (none by default: no rule).
resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_cidrs)

  security_group_id = aws_security_group.km.id
  description       = "SSH from an administrators' range (ssh_cidrs)"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = strcontains(each.value, ":") ? null : each.value
  cidr_ipv6         = strcontains(each.value, ":") ? each.value : null
  tags              = local.tags
}

resource "aws_vpc_security_group_egress_rule" "all" {
  # checkov:skip=CKV_AWS_382:Outbound traffic goes to destinations only the operator knows: the ACME CA, the SMTP server, external MongoDB, Elasticsearch and Redis on their own ports, and package mirrors for updates
  for_each = local.world

  security_group_id = aws_security_group.km.id
  description       = "Outbound to anywhere: ACME, SMTP, external datastores, package updates"
  ip_protocol       = "-1"
  cidr_ipv4         = each.value.ipv4
  cidr_ipv6         = each.value.ipv6
  tags              = local.tags
}

# The network interface, and the Elastic IP on it, exist before the instance: the
# machine has its public address from the first boot on (DNS for site_url and the ACME
# HTTP-01 validation point at it), rather than a temporary one swapped during setup.
resource "aws_network_interface" "km" {
  description        = "KM appliance ${var.name}"
  subnet_id          = var.subnet_id
  security_groups    = [aws_security_group.km.id]
  ipv6_address_count = var.ipv6_address_count
  tags               = local.tags
}

resource "aws_eip" "km" {
  domain            = "vpc"
  network_interface = aws_network_interface.km.id
  tags              = local.tags
}

resource "aws_instance" "km" {
  # checkov:skip=CKV2_AWS_41:The appliance calls no AWS API, so no role is attached by default (it would only add credentials reachable through the metadata service); var.iam_instance_profile attaches one
  ami                     = local.ami_id
  instance_type           = var.instance_type
  key_name                = var.key_name
  iam_instance_profile    = var.iam_instance_profile
  monitoring              = true
  ebs_optimized           = true
  disable_api_termination = var.deletion_protection
  user_data               = local.user_data
  tags                    = local.tags

  # The Elastic IP is on the interface before the machine boots.
  depends_on = [aws_eip.km]

  network_interface {
    network_interface_id = aws_network_interface.km.id
    device_index         = 0
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size
    encrypted             = true
    kms_key_id            = var.root_volume_kms_key_id
    delete_on_termination = true
    tags                  = local.tags
  }

  lifecycle {
    # The settings are applied once, at first boot; later changes go through the
    # dashboard or `km-wizard reopen`. A newer AMI is taken only when the instance is
    # replaced on purpose (terraform apply -replace): replacing it would lose the
    # embedded datastores on its root volume.
    ignore_changes = [ami, user_data]

    precondition {
      condition     = alltrue([for v in values(local.settings) : try(length(regexall("[\\r\\n\\x00]", v)), 0) == 0])
      error_message = "The appliance's settings cannot contain line breaks or NUL characters."
    }

    precondition {
      condition     = local.headless ? (var.admin_username != null && var.admin_email != null && var.admin_password != null) : true
      error_message = "A headless setup (licence set) needs admin_username, admin_email and admin_password: without a first admin, whoever signs up first on the public address would become admin."
    }

    precondition {
      condition     = var.km_tls != "acme" || startswith(coalesce(var.site_url, "-"), "https://")
      error_message = "km_tls = \"acme\" needs an https:// site_url: the certificate is issued for its host."
    }
  }
}
