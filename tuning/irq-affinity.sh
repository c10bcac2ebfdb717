#!/usr/bin/env bash
# Spreads a NIC's receive/transmit queue interrupts over chosen CPUs, so
# that they do not land on the cores running corecast shards.
#
#   sudo tuning/irq-affinity.sh IFACE CPULIST      e.g. eth0 0-1
#   tuning/irq-affinity.sh IFACE                   shows the current placement
#
# Give the NIC the cores left out of corecast.service's CPUAffinity (or of
# `taskset`), and start corecast with --shards matching the cores it keeps.
# irqbalance, when running, moves interrupts back: stop it, or ban the
# IRQs with IRQBALANCE_BANNED_CPULIST. Multi-queue NICs also spread
# receive work with RSS; `ethtool -l IFACE` shows the queue count.
set -euo pipefail

iface=${1:?usage: irq-affinity.sh IFACE [CPULIST]}
cpus=${2:-}

if [ ! -d "/sys/class/net/$iface" ]; then
  echo "no such interface: $iface (see ip link)" >&2
  exit 2
fi

# IRQs of the interface: MSI-X vectors listed by the device, else lines
# of /proc/interrupts that name it.
irqs=()
if [ -d "/sys/class/net/$iface/device/msi_irqs" ]; then
  for f in /sys/class/net/"$iface"/device/msi_irqs/*; do irqs+=("$(basename "$f")"); done
else
  while read -r irq _; do irqs+=("${irq%:}"); done < <(grep -E "[[:space:]]$iface(-|$)" /proc/interrupts || true)
fi
if [ ${#irqs[@]} -eq 0 ]; then
  echo "$iface has no interrupts of its own (virtual or loopback interface): nothing to do" >&2
  exit 0
fi

if [ -z "$cpus" ]; then
  for irq in "${irqs[@]}"; do
    [ -r "/proc/irq/$irq/smp_affinity_list" ] &&
      printf 'irq %s -> cpus %s\n' "$irq" "$(cat "/proc/irq/$irq/smp_affinity_list")"
  done
  exit 0
fi

if pgrep -x irqbalance >/dev/null; then
  echo "warning: irqbalance is running and may move these interrupts again" >&2
fi
for irq in "${irqs[@]}"; do
  if [ -w "/proc/irq/$irq/smp_affinity_list" ]; then
    echo "$cpus" >"/proc/irq/$irq/smp_affinity_list"
    printf 'irq %s -> cpus %s\n' "$irq" "$(cat "/proc/irq/$irq/smp_affinity_list")"
  else
    echo "cannot set irq $irq (run as root)" >&2
  fi
done
