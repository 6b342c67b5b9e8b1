// SPDX-License-Identifier: GPL-2.0
/*
 * p2pvm_channel: hands the p2pvm channel device's interrupt to user space
 * as an MSI-X message, through UIO.
 *
 * Debian's kernel gives user space a PCI function's interrupt only as INTx
 * (uio_pci_generic): every interrupt then costs register round trips to the
 * VMM (the handler masks INTx in the command register, user space unmasks
 * it). An MSI-X message needs neither: the handler below touches no
 * register, so an interrupt costs the guest no exit to the VMM at all.
 *
 * The driver maps nothing and claims no BAR: p2pd and the front-end map the
 * registers through sysfs and the region through /dev/mem as before (a
 * claimed BAR would be refused by CONFIG_IO_STRICT_DEVMEM). Without MSI-X
 * (an older VMM) probing fails and uio_pci_generic can take the function.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/uio_driver.h>

#define P2PVM_VENDOR_ID 0x1af4
#define P2PVM_DEVICE_ID 0x1110

struct p2pvm_channel {
	struct uio_info info;
};

static irqreturn_t p2pvm_channel_irq(int irq, struct uio_info *info)
{
	/* Edge-triggered and not shared: nothing to acknowledge. */
	return IRQ_HANDLED;
}

static int p2pvm_channel_probe(struct pci_dev *pdev,
			       const struct pci_device_id *id)
{
	struct p2pvm_channel *chan;
	int err;

	chan = devm_kzalloc(&pdev->dev, sizeof(*chan), GFP_KERNEL);
	if (!chan)
		return -ENOMEM;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	/* MSI-X messages are memory writes by the function. */
	pci_set_master(pdev);
	err = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX);
	if (err < 0) {
		dev_info(&pdev->dev, "no MSI-X (%d); leaving it to uio_pci_generic\n", err);
		return err;
	}
	chan->info.name = "p2pvm_channel";
	chan->info.version = "1";
	chan->info.irq = pci_irq_vector(pdev, 0);
	chan->info.irq_flags = 0;
	chan->info.handler = p2pvm_channel_irq;
	err = uio_register_device(&pdev->dev, &chan->info);
	if (err) {
		pci_free_irq_vectors(pdev);
		return err;
	}
	pci_set_drvdata(pdev, chan);
	return 0;
}

static void p2pvm_channel_remove(struct pci_dev *pdev)
{
	struct p2pvm_channel *chan = pci_get_drvdata(pdev);

	uio_unregister_device(&chan->info);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id p2pvm_channel_ids[] = {
	{ PCI_DEVICE(P2PVM_VENDOR_ID, P2PVM_DEVICE_ID) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, p2pvm_channel_ids);

static struct pci_driver p2pvm_channel_driver = {
	.name = "p2pvm_channel",
	.id_table = p2pvm_channel_ids,
	.probe = p2pvm_channel_probe,
	.remove = p2pvm_channel_remove,
};
module_pci_driver(p2pvm_channel_driver);

MODULE_DESCRIPTION("p2pvm inter-VM channel: MSI-X interrupt to user space via UIO");
MODULE_LICENSE("GPL");
